#!/usr/bin/env bash
# The project's GPU checks, in two parts that each fit one call of a lent GPU machine (~5 min each):
#
#   bash scripts/gpu_checks.sh kernels OUTDIR   # compiled Pallas kernels vs references (pytest -m gpu_only), then
#                                               # benchmarks/gpu_kernels.py ceilings, paged decode, DMC flash attention
#   bash scripts/gpu_checks.sh system OUTDIR    # benchmarks/train_mfu.py (DMC objective, Llama-2-7B layers),
#                                               # gpu_kernels.py end to end (7B-shaped decode), serve_load.py (HTTP)
#
# Runs under the machine's own python3 (its jax, jaxlib with CUDA, torch image). Packages that image lacks travel as
# wheels in .whl/ (see README "GPU checks": pip download ... -d .whl) and are installed into /tmp/site first.
# Every step has its own time limit and log in OUTDIR, so one that hangs or fails leaves the others' numbers.
set -u
part=${1:?usage: gpu_checks.sh kernels|system OUTDIR}
out=${2:?usage: gpu_checks.sh kernels|system OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/pip.log" 2>&1 || { echo "wheel install failed (see pip.log)"; tail -5 "$out/pip.log"; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log, print the status and the log's end
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit)"
  tail -n "${TAIL:-25}" "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"

case $part in
  kernels)
    TAIL=15 step pallas_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu_only tests/test_pallas_kernels.py
    TAIL=45 step gpu_kernels_kernels 240 python3 benchmarks/gpu_kernels.py --sections ceilings,decode,train \
      --json "$out/gpu_kernels_kernels.json"
    ;;
  system)
    TAIL=22 step train_mfu 120 python3 benchmarks/train_mfu.py --steps 5 --config configs/llama2_7b_dmc.py:cr4 \
      --config.mesh.fsdp=1 --config.mesh.data=1 --config.data.batch_size=8 --config.data.seq_len=4096 \
      --config.train.grad_accum=1 --config.plan.arch=llama2_7b,num_layers=8 --peak_tflops 989
    TAIL=20 step gpu_kernels_e2e 150 python3 benchmarks/gpu_kernels.py --sections ceilings,e2e --steps 16 \
      --json "$out/gpu_kernels_e2e.json"
    # the client and each server (one at a time) take GPU memory as needed, not 75% each up front
    XLA_PYTHON_CLIENT_PREALLOCATE=false TAIL=12 step serve_load 150 python3 benchmarks/serve_load.py --source random:smollm2_135m --requests 32 \
      --prompt-chars 2048 --max-tokens 2560 --gen-tokens 128 --dense-rows 4 --cr 4 --time-limit 60 \
      --json "$out/serve_load.json"
    tar czf "$out/serve_logs.tgz" runs/serve_load-* 2>/dev/null
    ;;
  *) echo "unknown part $part (kernels or system)"; exit 2 ;;
esac
