"""A process of the multi-process tests (tests/test_distributed.py); not a test module.

    train:    python -m tests.distributed_worker train OUT DATA,FSDP,TENSOR [DCN_DATA]
              trains the tiny model with the DMC objective for STEPS steps on fixed global batches (each process feeds
              its rows), through distributed.initialize (launcher env) and loop.train: OUT/metrics.jsonl,
              OUT/checkpoints
    restore:  python -m tests.distributed_worker restore CKPT_DIR DATA,FSDP,TENSOR
              restores the last checkpoint's arrays onto that mesh and onto one device; prints a JSON line with the
              specs used and the parameter checksums
    skew:     python -m tests.distributed_worker skew lined_up|plain SECONDS
              the last process sleeps SECONDS before its first call of a jitted reduce-scatter over every device
              (as if it compiled that long); 'lined_up' calls it through distributed.LinedUp; prints the sums
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, ROWS, SEQ_LEN = 6, 8, 32


def make_config(out: str, mesh: tuple, dcn_data: int = 1):
    from dmc_jax.config_loader import load_config_file
    from dmc_jax.dmc.objective import default_config as dmc_default_config

    c = load_config_file(os.path.join(ROOT, "configs", "smollm2_train.py"))
    c.model.source = "tiny"
    c.output_dir = out
    c.data.seq_len, c.data.batch_size = SEQ_LEN, ROWS
    c.train.update(objective="dmc", steps=STEPS, grad_accum=2, log_every=1, eval_every=0, progress=False,
                   tensorboard=False)
    c.optim.update(lr=3e-3, warmup_steps=1, schedule="constant")
    c.checkpoint.update(every_steps=3, max_to_keep=0, async_save=True)
    c.dmc = dmc_default_config()
    c.dmc.update(target_cr=2.0, zero_out_steps=2, retrofit_steps=3, decision_offset=2.0, window=4)
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    c.mesh.dcn_data = dcn_data
    return c


def global_batches(num: int) -> list[dict]:
    """Fixed [ROWS, SEQ_LEN] batches: random bytes in 1-3 packed segments per row, some padding."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(num):
        tokens = rng.integers(3, 259, (ROWS, SEQ_LEN), dtype=np.int32)
        segments = np.ones((ROWS, SEQ_LEN), np.int32)
        positions = np.tile(np.arange(SEQ_LEN, dtype=np.int32), (ROWS, 1))
        for r in range(ROWS):
            cut = int(rng.integers(4, SEQ_LEN - 4))
            segments[r, cut:] = 2
            positions[r, cut:] = np.arange(SEQ_LEN - cut)
            pad = int(rng.integers(0, 6))
            if pad:
                segments[r, -pad:] = 0
                tokens[r, -pad:] = 0
                positions[r, -pad:] = 0
        out.append({"tokens": tokens, "segment_ids": segments, "positions": positions})
    return out


def train(out: str, mesh: tuple, dcn_data: int) -> None:
    from dmc_jax.training import distributed

    config = make_config(out, mesh, dcn_data)
    distributed.initialize(config)  # before any device use
    import grain
    import jax

    from dmc_jax.tasks import common
    from dmc_jax.training.loop import TrainData, train as run_training
    from dmc_jax.training.objective import make_objective

    print(distributed.describe(), flush=True)
    model = common.load_model(config, "training")
    i, n = jax.process_index(), jax.process_count()
    per = ROWS // n
    rows = [{k: v[i * per:(i + 1) * per] for k, v in b.items()} for b in global_batches(STEPS)]
    iterator = iter(grain.MapDataset.source(rows).to_iter_dataset())
    summary = run_training(config, model, make_objective("dmc", config, model.cfg), TrainData(iterator))
    print("summary", json.dumps({"process": i, "final_loss": summary["final_loss"], "mesh": summary["mesh"]}),
          flush=True)


def restore(ckpt_dir: str, mesh: tuple) -> None:
    import jax
    import numpy as np

    from dmc_jax.tasks import common
    from dmc_jax.training import loop
    from dmc_jax.training.checkpoint import Checkpointer
    from dmc_jax.training.objective import make_objective

    out = {}
    for name, sizes, devices in (("mesh", mesh, None), ("one_device", (1, 1, 1), jax.devices()[:1])):
        config = make_config("unused", sizes)
        model = common.tiny_model(0)
        objective = make_objective("dmc", config, model.cfg)
        s = loop.setup(config, model.cfg, model.params, objective, devices=devices)
        with Checkpointer(ckpt_dir) as ckpt:
            step = ckpt.latest_step()
            state = ckpt.restore_state(step, s.abstract_state(model.params))
        leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
        out[name] = {"step": step, "mesh": dict(s.mesh.shape),
                     "specs": {jax.tree_util.keystr(p): str(x.sharding.spec) for p, x in leaves},
                     "params": {jax.tree_util.keystr(p): np.asarray(x, np.float64).ravel()[:64].tolist()
                                for p, x in leaves},
                     "sums": {jax.tree_util.keystr(p): float(np.asarray(x, np.float64).sum()) for p, x in leaves}}
    print("restored", json.dumps(out), flush=True)


def skew(mode: str, seconds: float) -> None:
    import time

    import ml_collections

    from dmc_jax.training import distributed

    config = ml_collections.ConfigDict({"distributed": distributed.default_config()})
    distributed.initialize(config)
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("d",))
    n = jax.device_count()
    scatter = jax.jit(jax.shard_map(lambda x: jax.lax.psum_scatter(x, "d", tiled=True), mesh=mesh,
                                    in_specs=P("d"), out_specs=P("d")))
    fn = distributed.LinedUp(scatter, "skew") if mode == "lined_up" else scatter
    from jax.experimental import multihost_utils

    per = jax.local_device_count() * n  # each device holds n values of arange(n * n); the reduce-scatter sums them
    local = np.arange(n * n, dtype=np.float32)[jax.process_index() * per:(jax.process_index() + 1) * per]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local, (n * n,))
    if jax.process_index() == jax.process_count() - 1:
        time.sleep(seconds)
    t0 = time.perf_counter()
    y = fn(x)
    total = float(np.sum(multihost_utils.process_allgather(y, tiled=True)))
    print("skew", json.dumps({"process": jax.process_index(), "sum": total, "seconds": time.perf_counter() - t0}),
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "skew":
        skew(sys.argv[2], float(sys.argv[3]))
        sys.exit(0)
    what, path, sizes = sys.argv[1], sys.argv[2], tuple(int(x) for x in sys.argv[3].split(","))
    if what == "train":
        train(path, sizes, int(sys.argv[4]) if len(sys.argv) > 4 else 1)
    else:
        restore(path, sizes)
