"""The data iterator saved and restored in the same orbax checkpoint step as the model parameters."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp

from dmc_jax.data import checkpointing, pipeline
from dmc_jax.data.prepare import prepare
from tests.test_data_helpers import ByteTokenizer, data_config, write_corpus


def test_params_and_iterator_restore_from_one_checkpoint_step(tmp_path):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "corpus"), num_threads=2)
    tokenizer = ByteTokenizer()
    prepare(cfg, tokenizer)
    params = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": {"bias": np.ones(4, np.float32)}}

    reference = pipeline.make_iterator(cfg, tokenizer)
    expected = [next(reference) for _ in range(8)][5:]

    iterator = pipeline.make_iterator(cfg, tokenizer)
    for _ in range(5):
        next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                             data=checkpointing.save_args(iterator)))
        mngr.wait_until_finished()
    next(iterator)  # the run goes on after the checkpoint, then dies

    fresh = pipeline.make_iterator(cfg, tokenizer)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        assert mngr.latest_step() == 5
        restored = mngr.restore(5, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract),
                                                           data=checkpointing.restore_args(fresh)))
    jax.tree.map(np.testing.assert_array_equal, dict(restored["params"]), params)
    resumed = restored[checkpointing.ITEM]
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
