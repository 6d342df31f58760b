"""dmc_jax.host_memory: after keep_freed_memory() a large buffer freed and allocated again costs no page faults (the
C library's default unmaps it and faults every page in again); the switches that leave the defaults alone."""

import os
import subprocess
import sys

import pytest

from dmc_jax import host_memory

# a 64 MB buffer (above glibc's largest mmap threshold, 32 MB) malloc'ed, written and freed five times; prints the
# minor page faults of rounds 2-5 and keep_freed_memory()'s line
_PROBE = r"""
import ctypes, resource, sys
from dmc_jax import host_memory
line = host_memory.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
print(line)
"""

_GLIBC = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


def _probe(**env_changes) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != host_memory.ENV_SWITCH}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.splitlines()
    return int(out[0]), out[1]


@pytest.mark.skipif(not _GLIBC, reason="the settings are glibc's (mallopt); other C libraries keep their defaults")
def test_freed_memory_is_reused_without_page_faults():
    kept_faults, line = _probe()
    assert "freed memory kept" in line
    default_faults, default_line = _probe(**{host_memory.ENV_SWITCH: "0"})
    assert "defaults" in default_line
    pages = 4 * (64 << 20) // 4096  # rounds 2-5 touch 65,536 pages
    if "[always]" not in _thp_mode():  # (with transparent huge pages always on, the default faults 2 MB at a time)
        assert default_faults > pages // 2, default_faults  # the default: every round faults its pages in again
    assert kept_faults < pages // 20, kept_faults  # kept: the heap's pages are reused


@pytest.mark.skipif(not _GLIBC, reason="the probe allocates through glibc's libc.so.6")
def test_the_users_allocator_choice_wins():
    # (a preload the loader cannot find is skipped with a warning: the name alone is what is checked)
    assert _probe(LD_PRELOAD="/nonexistent/libjemalloc.so.2")[1].endswith("preloaded allocator (LD_PRELOAD)")
    _, line = _probe(MALLOC_ARENA_MAX="2")
    assert line == "host memory: the malloc settings of the environment"
    _, line = _probe(**{host_memory.ENV_SWITCH: "0"})
    assert line.endswith(f"({host_memory.ENV_SWITCH}=0)")


def test_the_config_switch_applies_it_before_the_task_and_is_off_by_default(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != host_memory.ENV_SWITCH}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "dmc_jax.main", "--config", "configs/smollm2.py",
                               "--config.task=methods", f"--config.output_dir={tmp_path}", *extra], cwd=root,
                              env=env, capture_output=True, text=True, check=True).stdout

    on = run("--config.keep_freed_memory=True")
    assert on.splitlines()[0].startswith("host memory: ") and "results:" in on
    assert "host memory" not in run()
