"""The method registry: the one place that knows which KV-cache methods exist, what they take and what they are.

Each method declares itself next to its code with `register(MethodSpec(...))`: its name, a builder, its own config
section (`cache.<name>.<field>`, defaults + the checks its constructor runs), its traits, and, for a method a model
is trained for, a `TrainedMethod` (the top-level section of its trained hyper-parameters, the training objective,
how it is evaluated). Config validation, compare, export, generate/bench and the tests read this registry; nothing
else lists methods.

The built-in methods live in the modules of BUILTIN_MODULES (imported on first lookup, as a plug-in is); a package
outside dmc_jax adds a method with an entry point in the group `dmc_jax.cache_methods` whose module registers it, or
by calling `register` before it builds a config. A config's cache section:

    cache.method = 'auto'   # or a registered name; 'auto' = the model directory's own method, else 'dense'
    cache.budget = 256      # slots per (layer, sequence, KV head) of every budgeted method
    cache.<name>.<field>    # each method's own fields (e.g. cache.h2o.recent_ratio), defaults from its spec

Configs written before the per-method sections (flat fields such as `cache.h2o_recent_ratio`) keep working: a
method's `legacy` map names the flat field of each of its fields.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Mapping, Optional

import ml_collections

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.errors import UserError

BUILTIN_MODULES = (
    "dmc_jax.cache.dense",
    "dmc_jax.cache.streaming_llm",
    "dmc_jax.cache.h2o",
    "dmc_jax.cache.tova",
    "dmc_jax.cache.snapkv",
    "dmc_jax.cache.corm",
    "dmc_jax.cache.dmc_padded",
    "dmc_jax.cache.dmc_paged",
    "dmc_jax.cache.dms",
    "dmc_jax.cache.dms_paged",
)
ENTRY_POINT_GROUP = "dmc_jax.cache_methods"
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class TrainedMethod:
    """What a model trained for a method carries and how it is trained.

    section: the top-level config section of the trained hyper-parameters (e.g. 'dmc'); it is also the name of the
        training objective (train.objective) and is saved with the model (model_method.save).
    defaults / validate: that section's defaults (a dict) and its checks (raise UserError).
    objective: 'module:factory' of the Objective, factory(config, model_cfg) (imported only when training).
    evaluate: 'module:factory' of factory(section, control: bool) -> the training-form attention that computes
        exactly what the inference cache keeps (hard decisions), for held-out perplexity after training.
    serve_method: the cache method a model trained for this is served with by default (cache.method 'auto').
    engine_method: the paged cache method the serving engine uses instead under cache.method 'auto', when
        serve_method keeps a buffer per head (DMS: dms -> dms_paged, one pool shared by every head); '' = serve_method.
    validate_run: optional checks of the section against the rest of a training run's config (section, config),
        e.g. DMS's window against data.seq_len.
    prepare_model: optional 'module:function' (config, model_cfg, params) -> (model_cfg, params), run by the train
        task before the objective is built: parameters the method adds to a model (DMS's decision adapter).
    other_cache: optional (section) -> wrap or None, where wrap(method) serves the model's weights through ANOTHER
        cache method (dense, an eviction policy) as the trained attention runs when it compresses nothing (DMC's and
        DMS's decision channel zeroed: cache/zeroed_channel.py); model_method.resolve applies it.
    """

    section: str
    defaults: Callable[[], dict]
    validate: Callable[[ml_collections.ConfigDict], None]
    objective: str
    evaluate: str = ""
    serve_method: str = ""
    engine_method: str = ""
    validate_run: Optional[Callable[[ml_collections.ConfigDict, ml_collections.ConfigDict], None]] = None
    prepare_model: str = ""
    other_cache: Optional[Callable[[ml_collections.ConfigDict], Optional[Callable]]] = None


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One cache method.

    build(section, hparams) -> CacheMethod, where section is the method's own config section (its defaults
        overridden by the config; `budget` added for budgeted methods) and hparams the trained section
        (TrainedMethod.section) or None for training-free methods.
    defaults: the method's own fields and their defaults (cache.<name>.<field>).
    budgeted: takes cache.budget (compare sets it to context / CR); adaptive: its rule alone sets the CR (compare
        measures one row); trained: how models are trained for it (None = training-free).
    sized_by_cr: the section has a `target_cr` field that sizes its buffers; left 0, a model directory's trained
        CR sizes them (model_method.resolve).
    legacy: method field -> flat cache field of configs written before per-method sections.
    """

    name: str
    build: Callable[[ml_collections.ConfigDict, Optional[ml_collections.ConfigDict]], CacheMethod]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    budgeted: bool = False
    adaptive: bool = False
    trained: Optional[TrainedMethod] = None
    sized_by_cr: bool = False
    summary: str = ""
    legacy: Mapping[str, str] = dataclasses.field(default_factory=dict)


_SPECS: Dict[str, MethodSpec] = {}
_loaded = False


def register(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Adds a method (at import time of its module); a second method of the same name is an error."""
    if spec.name in _SPECS and not replace and _SPECS[spec.name] is not spec:
        raise ValueError(f"cache method {spec.name!r} is registered twice")
    if spec.name == AUTO or "." in spec.name or not spec.name.isidentifier():
        raise ValueError(f"cache method name {spec.name!r} must be an identifier other than {AUTO!r}")
    _SPECS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes a method (tests that register a toy method clean up with this)."""
    _SPECS.pop(name, None)


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    # Built-ins in BUILTIN_MODULES order (a test may have imported one of them first), then the others.
    order = {m: i for i, m in enumerate(BUILTIN_MODULES)}
    ranked = sorted(_SPECS.values(), key=lambda spec: order.get(spec.build.__module__, len(order)))
    _SPECS.clear()
    _SPECS.update((spec.name, spec) for spec in ranked)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plug-in must not take the built-in methods down with it
            print(f"warning: cache-method plug-in {ep.name} ({ep.value}) failed to load: {e}", flush=True)


def names() -> tuple:
    """Every registered method name, built-ins first."""
    _load()
    return tuple(_SPECS)


def get(name: str) -> MethodSpec:
    _load()
    if name not in _SPECS:
        raise UserError(f"cache.method must be one of {', '.join((AUTO,) + tuple(_SPECS))}; got {name!r}")
    return _SPECS[name]


def trained_sections() -> Dict[str, TrainedMethod]:
    """{trained section / objective name: TrainedMethod} over every registered method."""
    _load()
    return {s.trained.section: s.trained for s in _SPECS.values() if s.trained is not None}


def trained(section_name: str) -> Optional[TrainedMethod]:
    """The TrainedMethod whose section (= objective name) is section_name, or None."""
    return trained_sections().get(section_name)


def load_factory(path: str) -> Callable:
    """'module:attribute' -> the attribute (imported now)."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------------------------------------ config sections


def default_config() -> ml_collections.ConfigDict:
    """The cache section with every registered method's own section at its defaults."""
    c = ml_collections.ConfigDict()
    c.method = AUTO
    c.budget = 256
    for name in names():
        c[name] = ml_collections.ConfigDict(dict(_SPECS[name].defaults))
    return c


def trained_defaults(section_name: str) -> ml_collections.ConfigDict:
    t = trained(section_name)
    if t is None:
        raise UserError(f"no cache method is trained with a '{section_name}' section; known: "
                        f"{', '.join(trained_sections()) or 'none'}")
    return ml_collections.ConfigDict(t.defaults())


def method_section(cache: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The method's own section: its defaults, then legacy flat fields of the cache section, then cache.<name>;
    plus `budget` for a budgeted method. Unknown fields in cache.<name> are an error naming them."""
    spec = get(name)
    section = ml_collections.ConfigDict(dict(spec.defaults))
    for field, flat in spec.legacy.items():
        if flat in cache:
            section[field] = cache[flat]
    own = cache.get(name)
    if own is not None:
        if not isinstance(own, (ml_collections.ConfigDict, dict)):
            raise UserError(f"cache.{name} must be a section of {name}'s fields; got {own!r}")
        own = dict(own)
        unknown = sorted(set(own) - set(spec.defaults))
        if unknown:
            raise UserError(f"cache.{name} has no field {', '.join(unknown)}; its fields are "
                            f"{', '.join(spec.defaults) or 'none'}")
        for field, value in own.items():
            section[field] = value
    if spec.budgeted:
        budget = cache.get("budget", 256)
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise UserError(f"cache.budget must be an int (slots per layer, sequence and KV head); got {budget!r}")
        section.budget = budget
    return section


def build(name: str, cache: ml_collections.ConfigDict,
          hparams: Optional[ml_collections.ConfigDict] = None, **overrides) -> CacheMethod:
    """The method `name` with its section from the cache section (overrides, e.g. budget=, win) and, for a trained
    method, its hyper-parameters (None = the trained section's defaults)."""
    spec = get(name)
    section = method_section(cache, name)
    for field, value in overrides.items():
        section[field] = value
    if spec.trained is not None and hparams is None:
        hparams = trained_defaults(spec.trained.section)
    try:
        return spec.build(section, hparams if spec.trained is not None else None)
    except (AttributeError, KeyError, TypeError) as e:
        raise UserError(f"cache.{name}: bad or missing field ({e}); its fields are "
                        f"{', '.join(spec.defaults) or 'none'}") from None


def make_method(cache_config: ml_collections.ConfigDict,
                hparams: Optional[ml_collections.ConfigDict] = None) -> CacheMethod:
    """The method named by cache_config.method ('auto' = dense here: tasks resolve 'auto' against the model first,
    see dmc_jax.model_method.resolve), with its hyper-parameters from the section (and, for a trained method,
    `hparams`: its trained section, e.g. config.get('dmc'); None = that section's defaults)."""
    name = cache_config.get("method", "dense")
    return build("dense" if name == AUTO else name, cache_config, hparams)
