"""The retrofit section's side-by-side fields (task retrofit's step 6, dmc_jax/tasks/side_by_side.py): which
training-free methods stand next to the trained model at the CR it reached, and with which evaluations."""

from __future__ import annotations

import ml_collections

from dmc_jax.cache import registry
from dmc_jax.errors import require

DEFAULT_METHODS = ("h2o", "tova")


def validate(retrofit: ml_collections.ConfigDict, cache: ml_collections.ConfigDict | None = None) -> None:
    """retrofit's side-by-side fields; cache: the run's cache section (retrofit.calibrate_threshold needs dms_paged)."""
    methods = tuple(retrofit.get("side_by_side", DEFAULT_METHODS))  # the default task retrofit uses
    for name in methods:
        require(name in registry.names(), f"retrofit.side_by_side: {name!r} is not a cache method; use names from "
                                          f"task=methods, e.g. {', '.join(DEFAULT_METHODS)}")
        spec = registry.get(name)
        require(spec.budgeted and not spec.adaptive and spec.trained is None,
                f"retrofit.side_by_side: {name!r} is not a budgeted training-free method (its CR cannot be set to "
                f"the trained model's); use e.g. {', '.join(DEFAULT_METHODS)}")
    evals = tuple(retrofit.get("side_by_side_evals", ("ppl",)))
    require(evals and all(e in ("ppl", "passkey") for e in evals),
            f"retrofit.side_by_side_evals must be a non-empty tuple of 'ppl' and 'passkey'; got {evals!r}")
    require(int(retrofit.get("side_by_side_sequences", 4)) >= 1,
            f"retrofit.side_by_side_sequences must be >= 1; got {retrofit.get('side_by_side_sequences')!r}")
    if retrofit.get("calibrate_threshold", False):
        method = retrofit.get("method", "dmc")
        serving = (cache or ml_collections.ConfigDict()).get("method", "auto")
        require(method == "dms" and serving == "dms_paged",
                f"retrofit.calibrate_threshold chooses the serving threshold of a DMS model's page pool: it needs "
                f"retrofit.method='dms' and cache.method='dms_paged' (got {method!r} and {serving!r}); set them or "
                f"set retrofit.calibrate_threshold=False")
        files = retrofit.get("calibration_files", "")
        require(isinstance(files, str), f"retrofit.calibration_files must be comma-separated paths ('' = the training "
                                        f"corpus's own files); got {files!r}")
        require(int(retrofit.get("calibration_rows", 8)) >= 1,
                f"retrofit.calibration_rows must be >= 1; got {retrofit.get('calibration_rows')!r}")
