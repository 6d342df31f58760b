"""The DMS fields of a Hugging Face Qwen3 DMS config.json (nvidia/Qwen3-8B-DMS-8x, Model-Optimizer experimental/dms
exports) -> our `dms` section, or a one-line UserError naming a field we cannot honour.

Such a directory holds Qwen3's tensors; what makes it DMS is config.json: dms_window_size (w: a marked token stays
visible while t - j <= w, as ours), dms_alpha_scale and dms_initial_alpha_offset (a = raw * scale - offset),
dms_separate_alpha (false, the release: raw = the last channel of each KV group's first query head after q_norm,
then zeroed before and after RoPE: our decision='q_channel', decision_channel=-1, zero_after_rope=True; true,
Model-Optimizer's recipe: raw = dms_proj_alpha(dms_proj_alpha_norm(x)) of the layer input x, two more tensors per
layer: our decision='adapter', cfg.dms_adapter), dms_cr (the CR it was trained for: sizes the cache) and dms_tau
(the Gumbel-sigmoid temperature, training only). At inference a > 0 marks the previous token.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from dmc_jax.errors import UserError

# HF field -> (our `dms` field, kind); kind 'int' | 'num'
MAPPED = {
    "dms_window_size": ("window", "int"),
    "dms_alpha_scale": ("decision_scale", "num"),
    "dms_initial_alpha_offset": ("decision_offset", "num"),
    "dms_cr": ("target_cr", "num"),
    "dms_tau": ("temperature", "num"),
}
# fields honoured only at one value: (the value, why another cannot be)
FIXED = {
    "dms_alpha_per": ("head", "dmc_jax makes DMS decisions per KV head"),
    "dms_disable_eviction": (False, "a DMS model with eviction turned off is not supported; serve the base model "
                                    "instead"),
}
SEPARATE = "dms_separate_alpha"  # true: decisions from the adapter (dms_proj_alpha), false: from a query channel
# the reference implementation's own cache and compiler settings: no effect on what the model computes
IGNORED = ("dms_paged_attention_block_size", "dms_compile_limit", "dms_manual_inference_mode",
           "dms_chunked_prefill", "dms_preallocate_for_tokens")


def is_dms(d: Mapping[str, Any]) -> bool:
    """Does this config.json describe a DMS model (any dms_* field)?"""
    return isinstance(d, Mapping) and any(isinstance(k, str) and k.startswith("dms_") for k in d)


def has_adapter(d: Mapping[str, Any], path: str = "config.json") -> bool:
    """Does config.json `d` declare DMS decision adapters (dms_separate_alpha=true)? Checks every DMS field that
    the model's structure depends on (the loader calls this before reading tensors)."""
    if not is_dms(d):
        return False
    for key in sorted(k for k in d if k.startswith("dms_")):
        if key not in MAPPED and key not in FIXED and key not in IGNORED and key != SEPARATE:
            raise UserError(f"{path}: DMS field {key}={d[key]!r} is not known to dmc_jax; it cannot tell what the "
                            f"model needs it for (known: {', '.join(sorted(MAPPED) + sorted(FIXED) + [SEPARATE])})")
    for key, (value, why) in FIXED.items():
        if key in d and d[key] is not None and d[key] != value:
            raise UserError(f"{path}: {key}={d[key]!r} cannot be honoured: {why}")
    separate = d.get(SEPARATE, False)
    if not isinstance(separate, bool):
        raise UserError(f"{path}: {SEPARATE} must be true or false, got {separate!r}")
    return separate


def section_from_hf(d: Mapping[str, Any], path: str = "config.json") -> Optional[dict]:
    """Our `dms` section's fields set by config.json `d` (None if it is no DMS model); UserError naming the field
    and value of anything we cannot honour."""
    if not is_dms(d):
        return None
    adapter = has_adapter(d, path)
    if "dms_window_size" not in d:
        raise UserError(f"{path} has DMS fields but no dms_window_size; add the window the model was trained with")
    section = {"decision_channel": -1, "zero_after_rope": True, "decision": "adapter" if adapter else "q_channel"}
    for key, (ours, kind) in MAPPED.items():
        if key not in d or (d[key] is None and key != "dms_window_size"):
            continue
        value = d[key]
        ok = (isinstance(value, int) if kind == "int" else isinstance(value, (int, float))) \
            and not isinstance(value, bool)
        if not ok:
            raise UserError(f"{path}: {key} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        section[ours] = value if kind == "int" else float(value)
    if section["window"] < 0:
        raise UserError(f"{path}: dms_window_size must be >= 0, got {section['window']}")
    if section.get("decision_scale", 1.0) <= 0:
        raise UserError(f"{path}: dms_alpha_scale must be > 0, got {section['decision_scale']} (the decision is "
                        f"a > 0 with a = raw * scale - offset)")
    if section.get("temperature", 1.0) <= 0:
        raise UserError(f"{path}: dms_tau must be > 0, got {section['temperature']}")
    if section.get("target_cr", 1.0) < 1.0:
        raise UserError(f"{path}: dms_cr must be >= 1, got {section['target_cr']}")
    return section
