"""Multi-process JAX: `jax.distributed.initialize` from the config's `distributed` section, before any device use.

Where the process layout comes from (first match; distributed.cluster='auto'):
    explicit   distributed.coordinator_address ('host:port'), num_processes, process_id set in the config
    launcher   DMC_JAX_COORDINATOR, DMC_JAX_NUM_PROCESSES, DMC_JAX_PROCESS_ID in the environment
               (launch/local_multiprocess.py sets them for each process it spawns)
    slurm      SLURM_JOB_ID, SLURM_NTASKS > 1, SLURM_PROCID, ... (srun inside launch/slurm_train.sbatch): jax's own
               SLURM detection picks the coordinator (first node of the step) and each process's local GPU
    single     none of the above: one process, nothing to initialize
distributed.cluster='none' forces a single process, 'slurm' requires the SLURM environment.

On CPU, cross-process collectives need an implementation: distributed.cpu_collectives ('gloo' by default).
Each process then feeds its own rows of every batch (data.batch_size / process count, see dmc_jax/data/pipeline.py)
and writes its own shards of each checkpoint into the same directory (orbax); process 0 writes logs and results.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import ml_collections

from dmc_jax.errors import UserError

CLUSTERS = ("auto", "none", "slurm")
CPU_COLLECTIVES = ("gloo", "mpi", "none")
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "DMC_JAX_COORDINATOR", "DMC_JAX_NUM_PROCESSES", "DMC_JAX_PROCESS_ID"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def default_config() -> ml_collections.ConfigDict:
    """The `distributed` config section (every field optional: defaults mean 'detect, else one process')."""
    return ml_collections.ConfigDict(dict(
        cluster="auto",               # auto | none | slurm (see the module docstring)
        coordinator_address="",       # 'host:port' of process 0; '' = from the launcher env or SLURM
        num_processes=0,              # 0 = detect
        process_id=-1,                # -1 = detect
        local_device_ids="",          # e.g. '0,1' (devices of this process); '' = all visible, or SLURM_LOCALID
        cpu_collectives="gloo",       # cross-process collectives on CPU: gloo | mpi | none
        initialization_timeout=300,   # seconds to wait for every process to reach the coordinator
    ))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins: source in ('single', 'explicit', 'launcher', 'slurm') and the initialize kwargs."""

    source: str
    kwargs: dict

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def _section(config) -> ml_collections.ConfigDict:
    c = default_config()
    given = config.get("distributed") if config is not None else None
    if given is not None:
        c.update(given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given))
    return c


def validate(config) -> None:
    """UserError naming the first bad field of config.distributed (absent section: fine)."""
    c = _section(config)
    if c.cluster not in CLUSTERS:
        raise UserError(f"distributed.cluster must be one of {', '.join(CLUSTERS)}; got {c.cluster!r}")
    if c.cpu_collectives not in CPU_COLLECTIVES:
        raise UserError(f"distributed.cpu_collectives must be one of {', '.join(CPU_COLLECTIVES)}; "
                        f"got {c.cpu_collectives!r}")
    if c.coordinator_address and (":" not in c.coordinator_address or
                                  not c.coordinator_address.rsplit(":", 1)[1].isdigit()):
        raise UserError(f"distributed.coordinator_address must be 'host:port'; got {c.coordinator_address!r}")
    if c.coordinator_address and (c.num_processes < 1 or not 0 <= c.process_id < c.num_processes):
        raise UserError(f"distributed.coordinator_address is set, so distributed.num_processes (>= 1) and "
                        f"distributed.process_id (0 .. num_processes-1) must be too; got {c.num_processes}, "
                        f"{c.process_id}")
    _device_ids(c.local_device_ids)
    if c.initialization_timeout < 1:
        raise UserError(f"distributed.initialization_timeout must be >= 1 second; got {c.initialization_timeout}")


def _device_ids(text) -> Optional[list[int]]:
    if text in ("", None):
        return None
    try:
        return [int(x) for x in str(text).split(",")]
    except ValueError:
        raise UserError(f"distributed.local_device_ids must be comma-separated integers like '0,1'; got {text!r}")


def plan(config, environ: Optional[Mapping[str, str]] = None) -> Plan:
    """Where this process's layout comes from and the jax.distributed.initialize kwargs (pure: reads environ)."""
    env = os.environ if environ is None else environ
    c = _section(config)
    validate(config)
    common = {"initialization_timeout": int(c.initialization_timeout)}
    ids = _device_ids(c.local_device_ids)
    if ids is not None:
        common["local_device_ids"] = ids
    if c.cluster == "none":
        return Plan("single", {})
    if c.cluster == "auto" and c.coordinator_address:
        return Plan("explicit", dict(common, coordinator_address=c.coordinator_address,
                                     num_processes=int(c.num_processes), process_id=int(c.process_id)))
    if c.cluster == "auto" and env.get(ENV_COORDINATOR):
        try:
            n, i = int(env[ENV_NUM_PROCESSES]), int(env[ENV_PROCESS_ID])
        except (KeyError, ValueError):
            raise UserError(f"{ENV_COORDINATOR} is set, so {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be "
                            f"integers too (launch/local_multiprocess.py sets all three)") from None
        return Plan("launcher", dict(common, coordinator_address=env[ENV_COORDINATOR], num_processes=n,
                                     process_id=i))
    slurm = all(v in env for v in _SLURM_VARS)
    if c.cluster == "slurm" and not slurm:
        raise UserError(f"distributed.cluster='slurm' but this process does not run under srun (missing "
                        f"{', '.join(v for v in _SLURM_VARS if v not in env)}); launch with "
                        f"launch/slurm_train.sbatch or set distributed.cluster='auto'")
    if slurm and (c.cluster == "slurm" or int(env["SLURM_NTASKS"]) > 1):
        # jax's SlurmCluster derives the coordinator, count, rank and local device from the same variables.
        return Plan("slurm", dict(common, cluster_detection_method="slurm"))
    return Plan("single", {})


_initialized: Optional[Plan] = None


def initialize(config, environ: Optional[Mapping[str, str]] = None) -> Plan:
    """Joins the process group the config and environment describe (once per process); returns the plan used.

    Must run before anything touches a JAX device or backend.
    """
    global _initialized
    if _initialized is not None:
        return _initialized
    p = plan(config, environ)
    if not p.multi_process:
        _initialized = p
        return p
    import jax

    c = _section(config)
    if c.cpu_collectives != "none":
        jax.config.update("jax_cpu_collectives_implementation", c.cpu_collectives)
    try:
        jax.distributed.initialize(**p.kwargs)
    except Exception as e:  # unreachable coordinator, timeout, wrong rank: one line, not a traceback
        what = ", ".join(f"{k}={v}" for k, v in p.kwargs.items())
        raise UserError(f"jax.distributed.initialize failed ({p.source}: {what}): {type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:300]}; check that every process was started "
                        f"with the same coordinator and process count") from None
    _orbax_barriers_through_the_coordination_service()
    _no_persistent_cache_on_cpu()
    _initialized = p
    return p


def _no_persistent_cache_on_cpu() -> None:
    """On XLA:CPU with several processes the persistent compilation cache is turned off. jax writes entries from
    process 0 only and the other processes' cache keys differ on CPU (seen: process 1 misses the key process 0
    hits), so a cached run never saves the slowest process any time (LinedUp waits for it) and runs process 0's
    build from an earlier run beside the others' fresh builds of the same program. The resumed launch of
    tests/test_distributed.py's train test was the only launch there where that happened, and the one that hung
    on CI in two runs."""
    import jax

    if jax.default_backend() == "cpu" and jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)


def _orbax_barriers_through_the_coordination_service() -> None:
    """Orbax's own barriers (around every save and restore) are device collectives unless its absl flag
    experimental_orbax_use_distributed_barrier is set; on CPU a device collective whose processes arrive 30 s
    apart fails (see barrier). This program is not an absl app, so the flags are marked parsed first (defaults)."""
    from absl import flags
    from orbax.checkpoint import multihost  # noqa: F401  (defines the flag)

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, results and reports)."""
    import jax

    return jax.process_index() == 0


_uses: dict = {}  # (kind, name) -> times used: every process passes the same barriers and shares in the same
# order, so the n-th use of a name is the same coordination-service key on every process


def _key(kind: str, name: str) -> str:
    _uses[kind, name] = _uses.get((kind, name), 0) + 1
    return f"dmc_jax:{kind}:{name}:{_uses[kind, name]}"


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Every process waits here until all have arrived (no-op with one process). Through the coordination service
    (the jax distributed client's wait_at_barrier), not a device collective: on XLA:CPU the first collective of a
    device group sets up a gloo context whose key exchange gives up after 30 s, so a collective (jax's
    sync_global_devices, which orbax's sync_global_processes uses by default) whose processes arrive 30 s apart
    fails or hangs (jax-ml/jax#40831; reproduced by tests/distributed_worker.py skew)."""
    import jax

    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_jax_distributed_client().wait_at_barrier(_key("barrier", name), timeout_s * 1000)


class LinedUp:
    """A jitted function whose processes run each new program together: the first call with new argument shapes
    compiles it (AOT, into jit's own cache), waits at a coordination-service barrier for every process to have
    compiled too, then runs. Without this, one process compiling for 40 s while a peer (that found the program in
    the persistent cache) waits in the program's first reduce-scatter fails the run: XLA:CPU's gloo reduce-scatter
    gives up after 30 s whatever --xla_cpu_collective_timeout_seconds says (jax-ml/jax#40831). One process: a
    plain call. Everything else (.lower, ...) goes to the jitted function."""

    def __init__(self, jitted, name: str):
        self._jitted, self._name, self._seen = jitted, name, set()

    def __call__(self, *args):
        import jax

        if jax.process_count() > 1:
            leaves, tree = jax.tree.flatten(args)
            key = (tree, tuple((getattr(x, "shape", ()), str(getattr(x, "dtype", type(x)))) for x in leaves))
            if key not in self._seen:
                self._jitted.lower(*args).compile()
                barrier(self._name)
                self._seen.add(key)
        return self._jitted(*args)

    def __getattr__(self, name):
        return getattr(self._jitted, name)


def share_from_main(name: str, value: str | None, timeout_s: int = 1800) -> str:
    """Process 0's `value` on every process (the others pass None), through the coordination service's key-value
    store, not a device collective: process 0 may get there minutes after the others (it checks checksums,
    prepares data) and a gloo broadcast does not wait that long (see barrier). One process: `value` back."""
    import jax

    if jax.process_count() == 1:
        return value
    from orbax.checkpoint import multihost

    key = _key("share", name)
    client = multihost.get_jax_distributed_client()
    if jax.process_index() == 0:
        client.key_value_set(key, value)
        return value
    return client.blocking_key_value_get(key, timeout_s * 1000)


def describe() -> str:
    """One line: process i of n, local and global device counts."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} {jax.devices()[0].platform} devices")
