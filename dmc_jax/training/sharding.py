"""The device mesh (data, fsdp, tensor) and logical-axis rules: parameter, optimizer-state and batch shardings.

Parameters carry logical axis names (dmc_jax.model.params.logical_axes); mesh.rules map each name to mesh axes,
e.g. ('embed', 'fsdp'), ('heads', 'tensor'), ('batch', ('data', 'fsdp')). A dimension whose size the mesh axes do
not divide is replicated instead. Optimizer-state leaves that mirror a parameter (Adam's mu, nu) get its sharding;
the rest (counters) are replicated. Knows pytrees and names, never a method.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmc_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
                 ("kv_heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("head_dim", None))


def resolve_sizes(mesh_cfg, num_devices: int) -> list[int]:
    """[data, fsdp, tensor] with a -1 replaced by the devices left over."""
    sizes = [mesh_cfg[a] for a in AXES]
    if sizes.count(-1) == 1:
        known = math.prod(s for s in sizes if s != -1)
        sizes[sizes.index(-1)] = max(num_devices // known, 1)
    return sizes


def dcn_sizes(mesh_cfg) -> list[int]:
    """[dcn_data, dcn_fsdp, dcn_tensor]: how many granules (nodes) each axis spans; 1 when absent."""
    return [int(mesh_cfg.get(f"dcn_{a}", 1) or 1) for a in AXES]


def hybrid_devices(devices: Sequence[jax.Device], sizes: Sequence[int], dcn: Sequence[int]) -> np.ndarray:
    """Devices as a sizes-shaped array where axis i spans dcn[i] granules of sizes[i] / dcn[i] devices each.

    Granules are consecutive blocks of devices ordered by (process, id), i.e. nodes when ranks are node-major
    (srun's default): collectives over an axis with dcn 1 stay inside a node (NVLink), the rest cross nodes.
    """
    ici = [s // d for s, d in zip(sizes, dcn)]
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    arr = np.empty(len(ordered), dtype=object)
    arr[:] = ordered
    arr = arr.reshape(*dcn, *ici)  # granule-major
    n = len(sizes)
    perm = [p for i in range(n) for p in (i, n + i)]  # (dcn0, ici0, dcn1, ici1, ...)
    return arr.transpose(perm).reshape(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first data*fsdp*tensor devices; one size may be -1 (the rest).

    mesh.dcn_data / dcn_fsdp / dcn_tensor (default 1) say over how many nodes an axis is split (hybrid mesh).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_sizes(mesh_cfg, len(devices))
    need = math.prod(sizes)
    if need > len(devices):
        raise UserError(f"mesh data x fsdp x tensor = {' x '.join(map(str, sizes))} = {need} devices, but only "
                        f"{len(devices)} are available; lower mesh.data / mesh.fsdp / mesh.tensor")
    dcn = dcn_sizes(mesh_cfg)
    if any(s % d for s, d in zip(sizes, dcn)):
        raise UserError(f"mesh sizes {sizes} must be multiples of mesh.dcn_data/dcn_fsdp/dcn_tensor {dcn}")
    if math.prod(dcn) > 1:
        return Mesh(hybrid_devices(devices[:need], sizes, dcn), AXES)
    return Mesh(np.asarray(devices[:need], dtype=object).reshape(sizes), AXES)


def _mesh_axes(rules, name) -> tuple:
    for logical, axes in rules:
        if logical == name:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def mesh_spec(logical: P, shape: Sequence[int], mesh: Mesh, rules) -> P:
    """The mesh PartitionSpec of one array: each logical name mapped by rules; unused, size-1 and
    non-dividing mesh axes are dropped (that dimension is then replicated over them)."""
    used, out = set(), []
    for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = [a for a in _mesh_axes(rules, name) if a not in used and mesh.shape[a] > 1]
        if axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = []
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*out)


def param_shardings(logical_tree: Any, params: Any, mesh: Mesh, rules) -> Any:
    """NamedShardings for params (arrays or ShapeDtypeStructs) from their logical axis names."""
    return jax.tree.map(lambda spec, p: NamedSharding(mesh, mesh_spec(spec, p.shape, mesh, rules)),
                        logical_tree, params, is_leaf=lambda x: isinstance(x, P))


def _names(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path (and has its shape)
    gets that parameter's sharding; every other leaf is replicated."""
    by_path = {}
    for (path, p), (_, s) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(shardings)[0]):
        by_path[_names(path)] = (tuple(p.shape), s)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        names = _names(path)
        for n in range(1, len(names) + 1):
            hit = by_path.get(names[-n:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def activation_hints(mesh: Mesh, rules):
    """fn -> fn traced with dmc_jax.model.shard's activation names mapped to NamedShardings on mesh by rules."""
    import functools

    from dmc_jax.model.shard import activation_sharding

    def spec_fn(logical, shape):
        return NamedSharding(mesh, mesh_spec(P(*logical), shape, mesh, rules))

    def wrap(fn):
        @functools.wraps(fn)
        def traced(*args):
            with activation_sharding(spec_fn):
                return fn(*args)
        return traced

    return wrap


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Rows over the mesh axes of logical 'batch' (data and fsdp by default), time replicated."""
    axes = [a for a in _mesh_axes(rules, "batch") if mesh.shape[a] > 1]
    return NamedSharding(mesh, P(tuple(axes) if axes else None, None))


def batch_divisor(mesh: Mesh, rules) -> int:
    """How many shards the batch dimension is split into."""
    return math.prod(mesh.shape[a] for a in _mesh_axes(rules, "batch"))


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows (numpy [B_local, T]) as global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
