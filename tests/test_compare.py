"""Task compare on the random tiny model: every row runs (perplexity decoded through the cache, passkey,
multiple choice on a local task.json), budgets follow the ratios, and the table, JSON and plots are written."""

import json
import os

import jax.numpy as jnp
import numpy as np

from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.streaming_llm import StreamingLLMCache
from dmc_jax.evaluation.decode_perplexity import nll_through_cache
from dmc_jax.main import main
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "smollm2.py")


def test_decoded_perplexity_with_the_dense_cache_equals_the_forward_pass():
    import jax

    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
    nll, stats = nll_through_cache(llama.unstack_layers(params), tokens, DenseCache(), cfg, 5)
    logp = jax.nn.log_softmax(llama.forward(params, tokens, cfg), axis=-1)
    want = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0][:, 4:]
    np.testing.assert_allclose(nll, want, atol=1e-4)
    # A budget smaller than the text changes the scores of late tokens only.
    nll_s, stats_s = nll_through_cache(llama.unstack_layers(params), tokens, StreamingLLMCache(budget=12, n_sink=2),
                                       cfg, 5)
    np.testing.assert_allclose(nll_s[:, :7], nll[:, :7], atol=1e-4)
    assert float(jnp.max(jnp.abs(nll_s - nll))) > 1e-3
    assert int(stats_s["bytes_allocated"]) < int(stats["bytes_allocated"])


def test_compare_task_on_the_tiny_model(tmp_path):
    task_dir = tmp_path / "bb" / "fake_mc"
    task_dir.mkdir(parents=True)
    examples = [{"input": f"What is {i} plus {i}?", "target_scores": {str(2 * i): 1, str(2 * i + 1): 0}}
                for i in range(30)]
    (task_dir / "task.json").write_text(json.dumps({"examples": examples}))
    out = tmp_path / "run"
    argv = ["--config", CONFIG, "--config.task=compare", "--config.model.source=tiny", "--config.model.max_seq_len=0",
            f"--config.output_dir={out}", "--config.compare.context=64", "--config.compare.prefix=8",
            "--config.compare.ppl_sequences=2", "--config.compare.batch=2", "--config.compare.ratios=(4,)",
            "--config.compare.methods=('dense','streaming_llm')", "--config.compare.kv_heads=('mean:B','svd_a:A')",
            "--config.compare.passkey_lengths=(48,)", "--config.compare.passkey_depths=(0.5,)",
            "--config.compare.passkey_trials=1", "--config.compare.mc_tasks=('fake_mc',)",
            f"--config.compare.mc_cache_dir={tmp_path / 'bb'}", "--config.compare.mc_items=2",
            "--config.compare.mc_context=48", "--config.compare.min_budget=8",
            "--config.kv_heads.calib_sequences=2", "--config.kv_heads.calib_seq_len=32"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [("base", "dense"), ("base", "streaming_llm"),
                                                         ("kv mean:B", "dense"), ("kv svd_a:A", "dense")]
    assert rows[1]["budget"] == 16 and abs(rows[1]["logical_cr"] - 4.0) < 1e-6
    assert rows[1]["bytes_cr"] > 3 and abs(rows[2]["bytes_cr"] - 2.0) < 1e-6  # 2 -> 1 KV heads
    for r in rows:
        assert np.isfinite(r["ppl"]) and 0 <= r["passkey_acc"] <= 1 and set(r["mc"]) == {"fake_mc"}
    for name in ("compare.md", "ppl_vs_cr.png", "passkey.png"):
        assert (out / name).stat().st_size > 0
