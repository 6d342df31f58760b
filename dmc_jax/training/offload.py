"""Optimizer-state host offload (train.offload_opt_state): AdamW's mu and nu live in pinned host memory.

Between steps the state occupies no accelerator memory; inside the jitted step it is copied to the device for the
update and back to the host afterwards (XLA schedules the copies), so the forward / backward peak (activations)
and the update peak (state) no longer add up. Costs two host <-> device copies of the state per optimizer step
(PCIe / C2C), which gradient accumulation amortizes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

HOST = "pinned_host"


def host_shardings(shardings: Any) -> Any:
    """The same shardings in pinned host memory."""
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def offloaded(train_step: Callable, device_shardings: Any) -> Callable:
    """train_step(params, opt_state, ...) taking and returning opt_state in host memory."""
    host = host_shardings(device_shardings)

    def step(params, opt_state, *rest):
        opt_state = jax.device_put(opt_state, device_shardings)
        params, opt_state, metrics = train_step(params, opt_state, *rest)
        return params, jax.device_put(opt_state, host), metrics

    return step
