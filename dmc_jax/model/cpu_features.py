"""Whether this CPU multiplies bf16 matrices fast (AMX-BF16 or AVX512-BF16), and the compute dtype that follows.

XLA:CPU runs canonical bf16 x bf16 -> fp32 matmuls in its matmul library on these instructions (with
model/linear.py's layouts, forward and backward); without them bf16 is emulated and slower than fp32. jax 0.12.1
lost that path even with them (benchmarks/matmul_bf16.py; setup.cfg pins jax below it).
Read from /proc/cpuinfo (Linux); any other platform reports no fast bf16.
"""

from __future__ import annotations

import functools

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The feature flags of the first CPU in /proc/cpuinfo (empty when unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_matmul_fast(flags: frozenset | None = None) -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_FLAGS)


def default_compute_dtype(flags: frozenset | None = None) -> str:
    """'bfloat16' on a CPU with fast bf16 matmuls, else 'float32' (the CPU configs' model.compute_dtype)."""
    return "bfloat16" if bf16_matmul_fast(flags) else "float32"
