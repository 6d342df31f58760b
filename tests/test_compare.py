"""Task compare on the random tiny model: every row runs (perplexity decoded through the cache, passkey,
multiple choice on a local task.json), budgets follow the ratios, and the table, JSON and plots are written."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

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
    # none of these caches shares a pool across layers; strategy A's wrapper declares no state layout: by token
    assert [r["decode_order"] for r in rows] == ["layer", "layer", "layer", "token"]
    for r in rows:
        assert np.isfinite(r["ppl"]) and 0 <= r["passkey_acc"] <= 1 and set(r["mc"]) == {"fake_mc"}
    for name in ("compare.md", "ppl_vs_cr.png", "passkey.png"):
        assert (out / name).stat().st_size > 0


def test_a_dmc_model_directory_joins_the_comparison_with_its_own_dmc_hyperparameters(tmp_path):
    """task retrofit writes <run>/dmc/model with kv_method.json; compare (and every task that builds a DMC cache)
    reads the hyper-parameters from there: here a decision offset of -6 makes the random model merge almost every
    token, which the config's own dmc defaults (offset 5) would not, so CR > 1 proves the file was used."""
    import jax

    from dmc_jax.cache import model_method
    from dmc_jax.dmc.objective import default_config
    from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    cfg = tiny_config(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    section = default_config()
    section.update(dict(target_cr=3.0, decision_offset=-6.0, window=4))
    model_dir = str(tmp_path / "dmc_model")
    model_method.save(model_dir, cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(3))), tok,
                      "dmc_paged", section)
    saved = model_method.read(model_dir)
    assert saved.method == "dmc_paged" and saved.hparams.to_dict() == section.to_dict()
    assert model_method.read(str(tmp_path)) is None
    # generate / bench / validation build their cache from the same file, sized for the trained CR when unset;
    # cache.method 'auto' (the default) takes the directory's method
    from dmc_jax.config_loader import load_config_file
    config = load_config_file(CONFIG)
    config.model.source = model_dir
    method = model_method.make(config)
    assert method.name == "dmc_paged" and method.dmc.decision_offset == -6.0 and method.target_cr == 3.0
    assert config.cache.dmc_paged.target_cr == 0.0
    config.cache.method = "dmc"  # the other DMC cache reads the same trained section
    assert model_method.make(config).dmc.decision_offset == -6.0
    config.cache.dmc.target_cr = 5.0  # an explicit size wins
    assert model_method.make(config).target_cr == 5.0

    # and an ordinary model with fewer KV heads (e.g. an up-trained GQA model) with the dense cache
    gqa_cfg = cfg.replace(num_kv_heads=1)
    gqa_dir = str(tmp_path / "gqa_model")
    from dmc_jax.weights.hf_io import save_hf_dir
    save_hf_dir(gqa_dir, gqa_cfg, jax.tree.map(np.asarray, init_params(gqa_cfg, jax.random.PRNGKey(4))))

    out = tmp_path / "run"
    argv = ["--config", CONFIG, "--config.task=compare", "--config.model.source=tiny", "--config.model.max_seq_len=0",
            f"--config.output_dir={out}", "--config.compare.context=64", "--config.compare.prefix=8",
            "--config.compare.ppl_sequences=2", "--config.compare.batch=2", "--config.compare.ratios=(4,)",
            "--config.compare.methods=('dense',)", "--config.compare.kv_heads=()", "--config.compare.evals=('ppl',)",
            f"--config.compare.extra_models=('dmc|{model_dir}|dmc_paged','gqa|{gqa_dir}|dense')",
            "--config.cache.dmc_paged.page_size=16", "--config.cache.dmc_paged.margin=1.0"]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [(r["model"], r["method"], r["ratio"]) for r in rows] == [
        ("base", "dense", 1), ("dmc", "dmc_paged", 3.0), ("gqa", "dense", cfg.num_kv_heads / 1)]
    assert abs(rows[2]["bytes_cr"] - cfg.num_kv_heads) < 1e-6
    assert rows[1]["budget"] is None and np.isfinite(rows[1]["ppl"])
    assert rows[1]["logical_cr"] > 2.0 and rows[1]["bytes_cr"] > 1.5  # the pool is sized by target_cr 3


def test_compare_refuses_an_extra_model_that_does_not_exist_before_running_any_row(tmp_path, capsys):
    argv = ["--config", CONFIG, "--config.task=compare", "--config.model.source=tiny", "--config.model.max_seq_len=0",
            f"--config.output_dir={tmp_path / 'run'}",
            f"--config.compare.extra_models=('dmc|{tmp_path / 'missing'}|dmc_paged',)"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "not found" in err and "missing" in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_a_bad_decode_order_is_one_line_before_any_row(tmp_path, capsys):
    argv = ["--config", CONFIG, "--config.task=compare", "--config.model.source=tiny", "--config.model.max_seq_len=0",
            f"--config.output_dir={tmp_path / 'run'}", "--config.compare.decode_order=layers"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compare.decode_order must be 'auto' or 'token'" in err[0]
    assert not (tmp_path / "run" / "rows.json").exists()


def test_a_rerun_reuses_the_rows_measured_with_the_same_settings_and_measures_only_the_new_ones(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--config", CONFIG, "--config.task=compare", "--config.model.source=tiny",
              "--config.model.max_seq_len=0", f"--config.output_dir={out}", "--config.compare.context=64",
              "--config.compare.prefix=8", "--config.compare.ppl_sequences=2", "--config.compare.batch=2",
              "--config.compare.ratios=(4,)", "--config.compare.kv_heads=()", "--config.compare.evals=('ppl',)",
              "--config.compare.min_budget=8"]
    assert main(common + ["--config.compare.methods=('dense','tova')"]) == 0
    first = json.loads((out / "rows.json").read_text())["rows"]
    capsys.readouterr()
    assert main(common + ["--config.compare.methods=('dense','tova','corm')"]) == 0
    printed = capsys.readouterr().out
    second = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [r["key"] for r in second] == ["base|dense|1", "base|tova|4", "base|corm|-"]
    assert second[:2] == [r | {"bytes_cr": r["bytes_cr"]} for r in first]  # the same measurements, not new ones
    assert printed.count("reused") == 2 and "base corm CR None" in printed
    assert second[2]["budget"] is None and second[2]["logical_cr"] >= 1.0
    # Another method's cache fields do not matter to these rows; the row's own method's fields do.
    assert main(common + ["--config.compare.methods=('dense','tova')", "--config.cache.h2o.recent_ratio=0.25"]) == 0
    assert capsys.readouterr().out.count("reused") == 2
    # The corm row this grid does not name is kept (rows.json, the table and results.json), not dropped.
    kept = json.loads((out / "rows.json").read_text())["rows"]
    assert [r["key"] for r in kept] == ["base|dense|1", "base|tova|4", "base|corm|-"] and kept[2] == second[2]
    assert "corm" in (out / "compare.md").read_text()
    assert main(common + ["--config.compare.methods=('dense','tova')", "--config.cache.tova.per_head=True"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("reused") == 1 and "base tova CR 4.0" in printed
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["key"] for r in results["rows"]] == ["base|dense|1", "base|tova|4"]  # this grid's rows
    assert results["rows"][1]["cache_section"]["per_head"] and results["kept_rows"] == [second[2]]  # corm kept
    # Other settings (a different context): nothing is reused.
    other = [a.replace("context=64", "context=48") for a in common]
    assert other != common and main(other + ["--config.compare.methods=('dense',)"]) == 0
    assert "reused" not in capsys.readouterr().out


def test_a_full_per_head_buffer_is_an_error_or_counted_never_silent():
    """A DMS cache that keeps every token (decisions never evict) in 12 slots per head, over 24-token rows: with
    on_overflow='error' decoded perplexity and the passkey/multiple-choice path raise the cache's one-line error;
    with 'evict' the number comes with the count of tokens forced out."""
    import jax
    import pytest

    from dmc_jax.cache.dms import DMSCache
    from dmc_jax.dms.config import DMSConfig
    from dmc_jax.errors import UserError
    from dmc_jax.evaluation.decode_perplexity import decode_perplexity
    from dmc_jax.evaluation.forced_decode import prompt_then_decode

    cfg = tiny_config()
    params = llama.unstack_layers(init_params(cfg, jax.random.PRNGKey(0)))
    rows = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size))
    keep_all = DMSConfig(window=2, decision_offset=1e9)
    with pytest.raises(UserError, match="overflow"):
        decode_perplexity(params, rows, DMSCache(dms=keep_all, capacity=12), cfg, 4, 2)
    res = decode_perplexity(params, rows, DMSCache(dms=keep_all, capacity=12, on_overflow="evict"), cfg, 4, 2)
    L, K = cfg.num_layers, cfg.num_kv_heads
    assert res.overflow == 2 * L * K * (23 - 12)  # tokens 0..22 enter the cache (the last is only scored)
    zeros = np.zeros((2, 3), np.int32)
    with pytest.raises(UserError, match="overflow at prefill"):
        prompt_then_decode(params, rows[:, :16], np.full(2, 16, np.int32), zeros, zeros.astype(bool),
                           DMSCache(dms=keep_all, capacity=12, on_overflow="evict"), cfg)


def test_passkey_in_chunks_equals_all_prompts_at_once():
    import jax

    from dmc_jax.evaluation.passkey import run_passkey
    from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer

    cfg = tiny_config(vocab_size=ByteTokenizer.vocab_size)
    params = llama.unstack_layers(init_params(cfg, jax.random.PRNGKey(0)))
    tok = ByteTokenizer()
    filler = np.asarray(tok.encode("the cat sat on the mat and looked at the dog. " * 20), np.int32)
    run = lambda batch: run_passkey(params, cfg, tok, filler, lambda n: StreamingLLMCache(budget=n // 2, n_sink=2),
                                    (200,), (0.2, 0.8), trials=3, seed=1, answer_tokens=3, batch=batch)
    whole, chunks = run(0), run(4)  # 6 prompts: chunks of 4, the last one padded
    assert [c.answers for c in chunks] == [c.answers for c in whole]
    assert [(c.length, c.depth, c.trials) for c in chunks] == [(200, 0.2, 3), (200, 0.8, 3)]


def test_draw_keys_gives_the_prompts_run_passkey_asked_and_rechecks_its_hits(monkeypatch):
    """benchmarks/passkey_paired.py checks rows prompt by prompt with draw_keys: the keys must be run_passkey's."""
    import jax

    from dmc_jax.cache.dense import DenseCache
    from dmc_jax.evaluation import passkey
    from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer

    cfg = tiny_config(vocab_size=ByteTokenizer.vocab_size)
    params = llama.unstack_layers(init_params(cfg, jax.random.PRNGKey(0)))
    tok = ByteTokenizer()
    filler = np.asarray(tok.encode("the cat sat on the mat and looked at the dog. " * 20), np.int32)
    built = []
    real_build = passkey.build_prompt
    monkeypatch.setattr(passkey, "build_prompt", lambda *a: built.append(a[4]) or real_build(*a))  # each key built
    cells = passkey.run_passkey(params, cfg, tok, filler, lambda n: DenseCache(), (120, 160), (0.3, 0.7),
                                trials=2, seed=5, answer_tokens=2)
    drawn = passkey.draw_keys(len(filler), (120, 160), (0.3, 0.7), 2, seed=5)
    assert built == [key for n in (120, 160) for _, key, _ in drawn[n]]
    assert [d for n in (120, 160) for d, _, _ in drawn[n]] == [0.3, 0.3, 0.7, 0.7] * 2
    answers = [x for c in cells for x in c.answers]
    keys = [key for n in (120, 160) for _, key, _ in drawn[n]]
    assert [sum(passkey.is_correct(a, k) for a, k in zip(answers[i:i + 2], keys[i:i + 2])) for i in range(0, 8, 2)] \
        == [c.correct for c in cells]
    assert passkey.is_correct(" 12345.", 12345) and not passkey.is_correct("1234", 12345)
    # row_hits (benchmarks/claim_table.py --paired) rebuilds the same per-prompt hits from a stored row
    stored = [{"length": c.length, "depth": c.depth, "accuracy": c.accuracy, "answers": c.answers} for c in cells]
    hits = passkey.row_hits(stored, len(filler), seed=5)
    assert hits == [passkey.is_correct(a, k) for a, k in zip(answers, keys)]
    stored[0]["answers"] = [" %d" % keys[0], " %d" % keys[1]]  # the row now claims hits its accuracy does not say
    assert cells[0].correct < 2  # (random weights: it found at most one of the two)
    with pytest.raises(ValueError, match="do not match seed 5"):
        passkey.row_hits(stored, len(filler), seed=5)
    assert passkey.sign_test([1, 1, 1, 0], [0, 0, 0, 0]) == {"only_this": 3, "only_baseline": 0, "p_two_sided": 0.25}


def test_a_target_cr_the_user_sets_sizes_a_trained_models_cache_in_compare():
    from dmc_jax.cache import registry
    from dmc_jax.dms.objective import default_config as dms_section
    from dmc_jax.evaluation.compare_grid import method_factory

    hparams = dms_section()
    hparams.update(window=4, target_cr=10.0)
    section = registry.default_config()
    assert method_factory(section, "dms_paged", None, hparams)(64).target_cr == 10.0  # the model's own CR
    section.dms_paged.target_cr = 12.0
    assert method_factory(section, "dms_paged", None, hparams)(64).target_cr == 12.0  # the user's wins
