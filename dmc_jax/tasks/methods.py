"""Task `methods`: every registered cache method, its traits and its own config fields with their defaults."""

from __future__ import annotations

import ml_collections

from dmc_jax.cache import registry


def table() -> str:
    lines = ["| method | kind | fields (cache.<method>.<field> = default) | what it is |", "|---|---|---|---|"]
    for name in registry.names():
        spec = registry.get(name)
        kind = ("trained (" + spec.trained.section + " section)" if spec.trained is not None
                else "budgeted" if spec.budgeted else "adaptive" if spec.adaptive else "-")
        fields = ", ".join(f"{k}={v!r}" for k, v in spec.defaults.items()) or "-"
        lines.append(f"| {name} | {kind} | {fields} | {spec.summary} |")
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, model=None) -> dict:
    print(table())
    return {"methods": {n: {"budgeted": registry.get(n).budgeted, "adaptive": registry.get(n).adaptive,
                            "trained": registry.get(n).trained.section if registry.get(n).trained else None,
                            "defaults": dict(registry.get(n).defaults)} for n in registry.names()}}
