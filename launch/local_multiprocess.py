"""Runs one command as N JAX processes on this machine (multi-host code paths without a cluster).

    python launch/local_multiprocess.py --num_processes 2 --cpu_devices 4 -- \\
        python -m dmc_jax.main --config configs/smollm2_dmc.py --config.model.source=tiny --config.output_dir=runs/x

Each process gets DMC_JAX_COORDINATOR / DMC_JAX_NUM_PROCESSES / DMC_JAX_PROCESS_ID (read by
dmc_jax/training/distributed.py, so any dmc_jax.main task joins the group) and, with --cpu_devices, JAX on CPU with
that many devices per process (collectives through gloo). With --gpus_per_process K, process i sees GPUs
i*K .. i*K+K-1 (CUDA_VISIBLE_DEVICES). Output lines are prefixed with the process index; the exit code is the
first non-zero one (the others are stopped then), else 0; after --timeout seconds the processes still running print
their Python stacks and are killed (exit code 124).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, cpu_devices: int, gpus_per_process: int, base=None) -> dict:
    """The environment of process i of n."""
    env = dict(os.environ if base is None else base)
    env.update(DMC_JAX_COORDINATOR=f"127.0.0.1:{port}", DMC_JAX_NUM_PROCESSES=str(n), DMC_JAX_PROCESS_ID=str(i))
    if cpu_devices:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
        env["JAX_PLATFORMS"] = "cpu"
    elif gpus_per_process:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * gpus_per_process + k) for k in range(gpus_per_process))
    return env


def _pump(i: int, stream, out) -> None:
    for line in stream:
        out.write(f"[{i}] {line}")
        out.flush()


def _signal_all(procs, sig) -> None:
    for q in procs:
        if q.poll() is None:
            try:
                os.killpg(q.pid, sig)
            except ProcessLookupError:
                pass


def _stop(procs, first, grace: float) -> None:
    """Sends `first` to every live process group, then SIGKILL to those still alive `grace` seconds later."""
    _signal_all(procs, first)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(q.poll() is None for q in procs):
        time.sleep(0.1)
    _signal_all(procs, signal.SIGKILL)


def launch(command: list[str], num_processes: int, cpu_devices: int = 0, gpus_per_process: int = 0,
           port: int = 0, timeout: float | None = None) -> int:
    """Starts the processes, streams their output, returns the first non-zero exit code (else 0).

    As soon as one process fails the others are stopped (a dead peer leaves them waiting in collectives). After
    `timeout` seconds every process still running prints the Python stack of each of its threads (SIGABRT with
    faulthandler on, so a hang shows where it hangs) and is killed; the exit code is then 124."""
    port = port or free_port()
    procs, pumps = [], []
    for i in range(num_processes):
        env = process_env(i, num_processes, port, cpu_devices, gpus_per_process)
        env.setdefault("PYTHONFAULTHANDLER", "1")
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        t = threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    code = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while [p.poll() for p in procs].count(None):  # polls every process (any() would stop at the first)
            failed = [p.returncode for p in procs if p.returncode]
            if failed:
                code = failed[0]
                _stop(procs, signal.SIGTERM, 10)
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: timed out after {timeout:g} s; stacks of the processes still running follow",
                      flush=True)
                _stop(procs, signal.SIGABRT, 5)
                code = 124
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs, signal.SIGKILL, 0)
        code = 130
    code = code or next((p.returncode for p in procs if p.returncode), 0)
    for t in pumps:
        t.join(timeout=5)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--cpu_devices", type=int, default=0, help="run on CPU with this many devices per process")
    parser.add_argument("--gpus_per_process", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before every process is killed (after printing its stacks)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command each process runs")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_processes < 1:
        parser.error("give --num_processes >= 1 and a command after --")
    return launch(command, args.num_processes, args.cpu_devices, args.gpus_per_process, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
