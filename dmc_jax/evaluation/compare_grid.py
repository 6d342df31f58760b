"""Compare's grid: which rows (model, cache method, nominal CR) a comparison measures and how each is sized.
Pure functions of the compare options and the method registry's traits: nothing here loads a model or measures.

A budgeted method gets one row per ratio (budget = ceil(context / CR)); an adaptive one a single row at the CR its
rule reaches; a trained method (DMC) one row at the CR its model was trained for; the dense cache CR 1 (for another
model: the CR of its KV heads against the base model's, set when measured).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from dmc_jax.cache import registry


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the grid: `model` is 'base' or a label, `ratio` the nominal CR (None: set by the method/model)."""

    model: str
    method: str
    ratio: Optional[float]

    @property
    def key(self) -> tuple:
        return (self.model, self.method, self.ratio)


def base_rows(methods, ratios) -> list[Row]:
    """The base model's rows: dense at CR 1, then each method at each ratio (one row for an adaptive method)."""
    rows = [Row("base", "dense", 1.0)]
    for name in methods:
        spec = registry.get(name)
        if name == "dense":
            continue
        if spec.adaptive or not spec.budgeted:
            rows.append(Row("base", name, None))
        else:
            rows.extend(Row("base", name, float(r)) for r in ratios)
    return rows


def extra_rows(label: str, method: str, ratios, trained_cr: Optional[float]) -> list[Row]:
    """An extra model's rows: a trained method at its trained CR, dense or adaptive once, budgeted per ratio."""
    spec = registry.get(method)
    if spec.trained is not None:
        return [Row(label, method, float(trained_cr))]
    if method == "dense" or spec.adaptive or not spec.budgeted:
        return [Row(label, method, None)]
    return [Row(label, method, float(r)) for r in ratios]


def budget(method: str, ratio: Optional[float], context: int) -> Optional[int]:
    """Slots per (layer, sequence, KV head) of a budgeted method at `ratio` for `context` tokens, else None."""
    spec = registry.get(method)
    if ratio is None or not spec.budgeted:
        return None
    return max(1, math.ceil(context / ratio))


def method_factory(cache_section, method: str, ratio: Optional[float], hparams=None):
    """length -> the cache method of a row: budget = ceil(length / ratio) for a budgeted method; a trained method
    (DMC) sized by the CR its model was trained for (its target_cr x margin; a cache.<method>.target_cr the user set
    wins) with its hyper-parameters."""
    spec = registry.get(method)

    def make(length: int):
        overrides = {}
        if spec.budgeted and ratio is not None:
            overrides["budget"] = budget(method, ratio, length)
        if (spec.trained is not None and spec.sized_by_cr and hparams is not None
                and not registry.method_section(cache_section, method).get("target_cr", 0.0)):
            overrides["target_cr"] = float(hparams.target_cr)  # as model_method does: a target_cr set wins
        return registry.build(method, cache_section, hparams, **overrides)
    return make
