"""Test-session hooks. Each test module's compiled programs are dropped when the module ends, so a long-lived
pytest-xdist worker does not keep every module's jit caches (without this a worker grew to ~4.5 GB over the suite)."""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()
