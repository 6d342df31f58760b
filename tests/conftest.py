"""Test-session hooks.

XLA compiles the tests' programs without LLVM's optimizations (`--xla_backend_optimization_level=0`, unless
XLA_FLAGS already sets a level): the suite's time goes mostly to compiling many small programs, not to running
them, and unoptimized code computes the same results (XLA's own graph passes still run; no fast math) at about
half the compile time, except that transcendental functions (exp, log, erf_inv: e.g. jax.random's normal) may
differ in the last bits, so no test compares values it draws again with files written outside the tests
bit for bit (the CPU model moves them too: a CI machine drew jax.random normals 2e-6 away from ours).

The session shares one persistent compilation cache (a fresh temporary directory, removed at the end) between its
pytest-xdist workers and the subprocesses the tests start (`python -m dmc_jax.main`, the multi-process workers):
a program compiled once, e.g. the same training step in a run and in its resumed run, is loaded, not recompiled.
The cache's size limit turns on its file lock, so two processes never read a half-written entry.

Both are set before any backend starts, in the environment, so subprocesses inherit them.

Each test module's compiled programs are dropped from memory when the module ends, so a long-lived pytest-xdist
worker does not keep every module's jit caches (without this a worker grew to ~4.5 GB over the suite)."""

import gc
import os
import shutil
import tempfile

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # set here: by the pytest process the workers inherit from
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dmc_jax_test_xla_cache_")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made the directory removes it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
