"""lm-eval backend `dmc_jax`: lm_eval.simple_evaluate on the local tasks in tests/fixtures/lm_eval_tasks.

Dense cache: every log-likelihood equals a full forward pass (fp32 rounding) and generation equals greedy argmax
of it. Compressed cache (H2O): the numbers equal task compare's own code on the same text, its multiple choice
(forced_decode.prompt_then_decode) and its decoded perplexity (decode_perplexity.nll_through_cache).
Needs the eval extra (lm-eval), which the test extra includes.
"""

import os
import subprocess
import sys

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks read local JSON-lines files only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dmc_jax.errors import UserError  # noqa: E402
from dmc_jax.evaluation import lm_eval_model  # noqa: E402
from dmc_jax.evaluation.decode_perplexity import nll_through_cache  # noqa: E402
from dmc_jax.evaluation.forced_decode import prompt_then_decode  # noqa: E402
from dmc_jax.evaluation.lm_eval_backend import DmcJaxLM, bucket  # noqa: E402
from dmc_jax.model import llama  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join("tests", "fixtures", "lm_eval_tasks")  # data_files are relative to the checkout root
MC, ROLLING, GEN = "dmc_jax_fixture_mc", "dmc_jax_fixture_rolling", "dmc_jax_fixture_gen"
ARGS = dict(source="tiny", max_length=64, batch_size=4)  # max_length 64: the long text takes three windows
WIDTH = 80  # every reference forward pass is right-padded to this (causal: earlier logits unchanged): one compile
_forward = jax.jit(llama.forward, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def tasks():
    cwd = os.getcwd()
    os.chdir(ROOT)
    yield TaskManager(include_path=TASKS_DIR, include_defaults=False)
    os.chdir(cwd)


def _run(lm, tasks, names):
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tasks, log_samples=True, bootstrap_iters=0)
    return out, {t: out["samples"][t] for t in names}


def _pairs(lm, samples):
    """(context ids, continuation ids, backend log-likelihood) of every loglikelihood request."""
    out = []
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            out.append((ctx, cont, resp[0][0]))
    return out


def _windows(lm, samples):
    """([(context ids, continuation ids) of each window], backend total) per rolling document."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    out = []
    for s in samples:
        ids = lm.tok_encode(s["arguments"][0][0], add_special_tokens=False)
        wins = list(map(make_disjoint_window, get_rolling_token_windows(ids, lm.prefix_token_id, lm.max_length, 1)))
        out.append((wins, s["resps"][0][0]))
    return out


def _forward_logp(lm, ids):
    """Log-probabilities [len(ids) - 1] of ids[1:] under one full forward pass."""
    logits = _forward(lm.model.params, jnp.asarray([ids + [0] * (WIDTH - len(ids))], jnp.int32), lm.model.cfg)[0]
    logp = jax.nn.log_softmax(logits[:len(ids)], axis=-1)
    return np.asarray(jnp.take_along_axis(logp[:-1], jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0])


def _greedy_forward(lm, prompt, n):
    """Text of n greedy tokens after prompt, each the argmax of a full forward pass (stops at a stop id)."""
    ids = list(prompt)
    for _ in range(n):
        logits = _forward(lm.model.params, jnp.asarray([ids + [0] * (WIDTH - len(ids))]), lm.model.cfg)[0]
        ids.append(int(jnp.argmax(logits[len(ids) - 1])))
        if ids[-1] in lm.tokenizer.stop_ids:
            ids.pop()
            break
    return lm.tokenizer.decode(ids[len(prompt):])


def test_dense_cache_equals_forward_pass(tasks):
    lm = DmcJaxLM(**ARGS)
    out, samples = _run(lm, tasks, [MC, ROLLING, GEN])
    pairs = _pairs(lm, samples[MC])
    assert len(pairs) == 11  # 4 questions x their choices
    for ctx, cont, got in pairs:
        want = _forward_logp(lm, ctx + cont)[len(ctx) - 1:].sum()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    windows = _windows(lm, samples[ROLLING])
    assert [len(w) for w, _ in windows] == [1, 3, 1]
    for wins, got in windows:
        want = sum(_forward_logp(lm, c + w)[len(c) - 1:].sum() for c, w in wins)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for s in samples[GEN]:  # greedy argmax of the forward pass, up to 12 tokens, cut at the first newline
        context, gen_kwargs = s["arguments"][0]
        assert s["resps"][0][0] == _greedy_forward(lm, lm.tok_encode(context), 12).split("\n")[0]
    assert set(out["results"]) == {MC, ROLLING, GEN} and "acc,none" in out["results"][MC]
    stats = out["config"]["dmc_jax"]["cache_stats"]
    assert stats["loglikelihood"]["requests"] == 11 and stats["loglikelihood"]["compression_ratio"] == 1.0
    assert stats["loglikelihood_rolling"]["requests"] == 5 and stats["generate_until"]["requests"] == 3


def test_compressed_cache_equals_compare(tasks):
    lm = DmcJaxLM(**ARGS, cache="h2o", budget=8)
    out, samples = _run(lm, tasks, [MC, ROLLING])
    method = lm.loaded.method_for(0)
    assert method.budget == 8
    pairs = _pairs(lm, samples[MC])
    T, N = bucket(max(len(c) for c, _, _ in pairs), 16), 4
    prompt = np.zeros((len(pairs), T), np.int32)
    forced = np.zeros((len(pairs), N), np.int32)
    for i, (ctx, cont, _) in enumerate(pairs):
        prompt[i, :len(ctx)], forced[i, :len(cont)] = ctx, cont
    logp, _ = prompt_then_decode(lm.model.params, prompt, np.array([len(c) for c, _, _ in pairs], np.int32),
                                 forced, np.ones_like(forced, bool), method, lm.model.cfg)  # compare's MC scoring
    for i, (ctx, cont, got) in enumerate(pairs):
        np.testing.assert_allclose(got, np.asarray(logp)[i, :len(cont)].sum(), rtol=1e-5, atol=1e-4)
    windows = _windows(lm, samples[ROLLING])
    for wins, got in windows:
        want = sum(-float(jnp.sum(nll_through_cache(lm.model.params, jnp.asarray([c + w]), method, lm.model.cfg,
                                                    len(c))[0]))
                   for c, w in wins)  # compare's decoded perplexity: the window's context is its prefix
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    wins, got = max(windows, key=lambda w: len(w[0]))  # the budget really compresses: not the dense score
    assert abs(got - sum(_forward_logp(lm, c + w)[len(c) - 1:].sum() for c, w in wins)) > 1e-2
    stats = out["config"]["dmc_jax"]["cache_stats"]
    assert stats["loglikelihood_rolling"]["compression_ratio"] > 3  # 64-token windows in 8 slots per head


def test_ratio_sets_each_request_budget():
    loaded = lm_eval_model.load("tiny", "tova", ratio=4, budget_step=8)
    assert [loaded.method_for(n).budget for n in (1, 32, 33, 100, 256)] == [8, 8, 16, 32, 64]
    assert loaded.method_for(100) is loaded.method_for(97)  # one method (one compilation) per budget
    assert [bucket(n, 4) for n in (1, 4, 5, 6, 7, 9, 13, 100)] == [4, 4, 6, 6, 8, 12, 16, 128]


def test_entry_point_resolves_to_the_backend():
    """lm-eval releases with plugin discovery register each `lm_eval.models` entry point as a lazy placeholder in
    the model registry (`lm_eval --model dmc_jax` then needs no launcher); resolve ours the same way."""
    from importlib.metadata import entry_points

    from lm_eval.api.model import LM
    from lm_eval.api.registry import Registry

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "dmc_jax"]
    registry = Registry("model", base_cls=LM)
    registry.register("dmc_jax", target=ep)
    assert registry.get("dmc_jax") is DmcJaxLM


@pytest.mark.parametrize("args, message", [
    (dict(cache="h2o", ratio=2), "needs source="),
    (dict(source="tiny", cache="lru"), "cache='lru' is not a cache method"),
    (dict(source="tiny", cache="h2o"), "needs ratio=R"),
    (dict(source="tiny", cache="dense", ratio=2), "apply to the budgeted caches"),
    (dict(source="tiny", cache="h2o", ratio=2, budget=8), "exclude each other"),
    (dict(source="tiny", cache="h2o", ratio="x"), "ratio='x': expected a float"),
    (dict(source="tiny", window=3), "'window' is not an argument"),
])
def test_bad_model_args_are_one_line_errors(args, message):
    with pytest.raises(UserError, match=message) as e:
        DmcJaxLM(**args)
    assert "\n" not in str(e.value)


def test_command_line(tmp_path):
    """The launcher runs lm-eval's own command line; a bad model_arg ends with one line and exit status 2."""
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "dmc_jax.evaluation.lm_eval_cli", "--model", "dmc_jax", "--tasks", MC,
            "--include_path", TASKS_DIR]
    bad = subprocess.run(base + ["--model_args", "source=tiny,cache=lru"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: model_args cache='lru' is not a cache method")
    ok = subprocess.run(base + ["--model_args", "source=tiny,max_length=64", "--limit", "1", "--batch_size", "1",
                                "--output_path", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "dmc_jax_fixture_mc" in ok.stdout and "acc_norm" in ok.stdout  # lm-eval's results table
    assert "[dmc_jax] loglikelihood through cache dense: 3 requests, compression ratio 1.00" in ok.stderr
