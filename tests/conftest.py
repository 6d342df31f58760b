"""Test-session hooks.

XLA compiles the tests' programs without LLVM's optimizations (`--xla_backend_optimization_level=0`, unless
XLA_FLAGS already sets a level): the suite's time goes mostly to compiling many small programs, not to running
them, and unoptimized code computes the same IEEE results (XLA's own graph passes still run; no fast math) at about
half the compile time. It is set before any backend starts, so subprocesses that inherit the environment use it
too.

Each test module's compiled programs are dropped when the module ends, so a long-lived pytest-xdist worker does not
keep every module's jit caches (without this a worker grew to ~4.5 GB over the suite)."""

import gc
import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
