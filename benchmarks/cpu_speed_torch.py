"""transformers' side of benchmarks/cpu_speed.py: SmolLM2 on PyTorch CPU, fp32 and bf16, one JSON line on stdout.

Runs in a separate environment with torch and transformers (never dmc_jax's dependencies):

    <torch-env>/bin/python benchmarks/cpu_speed_torch.py --gguf FILE [--repeats 3]

Times, with torch's default threads and the model loaded from the same GGUF as dmc_jax:
  train_step  loss + backward of a 4 x 256 batch (fp32; bf16 = torch.autocast(cpu, bfloat16) on fp32 weights)
  prefill     one forward of B=1, T=512 (inference_mode; bf16 = weights cast to bf16)
  decode_B    greedy generate of 64 new tokens after a 16-token prompt, B = 1 and 8, per-sequence tokens/s
Each number is the median over --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _median_s(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _load(gguf: Path):
    """transformers' model from the GGUF in fp32 (from_pretrained; without accelerate, which transformers 5 needs
    for GGUF files there, from the dequantized tensors of its own GGUF reader)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        import accelerate  # noqa: F401
    except ImportError:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        with tempfile.TemporaryDirectory(prefix="smollm2_gguf_") as d:
            os.symlink(gguf, Path(d) / gguf.name)
            config = AutoConfig.from_pretrained(d, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model_to_load = model
        state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model_to_load)["tensors"]
        missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        return model
    with tempfile.TemporaryDirectory(prefix="smollm2_gguf_") as d:
        os.symlink(gguf, Path(d) / gguf.name)
        return AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf.name, dtype=torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--parts", default="train_step,prefill,decode")
    args = ap.parse_args(argv)
    import torch
    import transformers

    model = _load(args.gguf.resolve())
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    parts = set(args.parts.split(","))
    out = {"torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads()}
    for dtype in ("float32", "bfloat16"):
        res = out[dtype] = {}
        if "train_step" in parts:
            model.train()
            x = torch.randint(3, vocab, (4, 256), generator=gen)

            def step():
                model.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()

            res["train_step_s"] = _median_s(step, args.repeats)
            model.zero_grad(set_to_none=True)
        model.eval()
        m = model.to(torch.bfloat16) if dtype == "bfloat16" else model
        with torch.inference_mode():
            if "prefill" in parts:
                x = torch.randint(3, vocab, (1, 512), generator=gen)
                res["prefill_tokens_per_s"] = 512 / _median_s(lambda: m(input_ids=x, use_cache=False), args.repeats)
            if "decode" in parts:
                for B in (1, 8):
                    p = torch.randint(3, vocab, (B, 16), generator=gen)
                    kw = dict(attention_mask=torch.ones_like(p), do_sample=False, num_beams=1,
                              max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens)
                    s = _median_s(lambda: m.generate(p, **kw), args.repeats)
                    res[f"decode_B{B}_tokens_per_s_per_seq"] = args.decode_tokens / s  # prefill of 16 included
        model = m.to(torch.float32)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
