"""Task serve with a DMS model (learned delayed eviction, cache.method=dms_paged; `auto` from a model directory whose
kv_method.json says dms): greedy text equals task generate's alone and among concurrent requests, the pool's pages
are counted in /metrics and come back, rows are sized for the model's CR, and a pool too small for the load queues
and preempts while every request completes; the query prompt rule serves as task generate does. The model: the tiny random model saved with a DMS section whose
decisions read the sign of a random query channel (scale 1, offset 0: about half the tokens marked), window 4."""

import concurrent.futures
import dataclasses
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("openai")

from dmc_jax.cache import model_method, registry  # noqa: E402
from dmc_jax.cache.dms_paged import DMSPagedCache  # noqa: E402
from dmc_jax.inference.generate import GenerateConfig, generate  # noqa: E402
from dmc_jax.serving.sizing import size  # noqa: E402
from dmc_jax.tasks import common, serve  # noqa: E402
from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer  # noqa: E402
from tests.test_serve import Server as _Server, _complete, _config  # noqa: E402

WINDOW, PAGE = 4, 8
# 6 rows and a pool of 144 pages of 8 slots (the least it may have is one uncompressed sequence of 256 tokens and
# one step: 4 heads x 33 pages): enough for a few short requests at once, too small for 6 rows of 100 tokens
SERVE = (f"--config.cache.dms_paged.page_size={PAGE}", "--config.serve.cache_mb=0.15", "--config.serve.max_rows=6")


def Server(config):
    """A server of the saved tiny DMS model (its directory has no tokenizer files: the tiny model's byte tokenizer)."""
    model = common.load_model(config, require_tokenizer=False)
    server = _Server(config, dataclasses.replace(model, tokenizer=ByteTokenizer()))
    # preempted requests are prefilled again at new prompt buckets (compiles): on a loaded machine one of the 8
    # requests of the pool test may take over the helper's 60 s
    server.client = server.client.with_options(timeout=600)
    return server


def _dms_config(model_dir, *overrides):
    return _config(f"--config.model.source={model_dir}", "--config.serve.model_name=tiny", *overrides)


@pytest.fixture(scope="module")
def dms_dir(tmp_path_factory):
    model = common.tiny_model(0)
    hparams = registry.trained_defaults("dms")
    hparams.update(window=WINDOW, decision_scale=1.0, decision_offset=0.0, target_cr=2.0)
    path = str(tmp_path_factory.mktemp("dms") / "model")
    return model_method.save(path, model.cfg, model.params, model.tokenizer, "dms", hparams)


@pytest.fixture(scope="module")
def dms(dms_dir):
    server = Server(_dms_config(dms_dir, "--config.cache.method=dms_paged", *SERVE))
    yield server
    server.close()


def _generate(server, prompt, max_new_tokens):
    tok, model = server.model.tokenizer, server.model
    method = model_method.make(server.config)
    gen = generate(model.params, [tok.encode(prompt)], model.cfg, method,
                   GenerateConfig(max_new_tokens=max_new_tokens, stop_ids=tuple(tok.stop_ids)), jax.random.PRNGKey(0))
    return tok.decode([t for t in gen.tokens[0] if t not in tok.stop_ids]), method.stats(gen.state, gen.lengths)


def test_greedy_text_equals_task_generate_alone_and_among_concurrent_requests_and_pages_come_back(dms):
    info, sizing = dms.info, dms.engine.sizing
    assert info["cache_method"] == "dms_paged" and info["pages"] > 0 and sizing.heads == 4
    method = dms.engine.method
    assert isinstance(method, DMSPagedCache) and method.dms.window == WINDOW and method.target_cr == 2.0
    # the rows are sized for the model's CR: a head keeps its last w + 1 tokens, then half of the rest
    assert sizing.expected_cr == 2.0 and sizing.always_kept == WINDOW + 1
    assert sizing.expected_pages(256) == 4 * int(np.ceil((5 + 251 / 2) / PAGE))
    prompts = [f"Prompt number {i}: " + "abc" * i for i in range(4)]
    alone = [_complete(dms, p, max_tokens=16).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: _complete(dms, p, max_tokens=16).choices[0].text, prompts))
    assert together == alone
    assert _generate(dms, prompts[1], 16)[0] == alone[1]
    m = dms.metrics()
    assert m["peak_active_sequences"] >= 2 and m['requests_total{outcome="error"}'] == 0
    assert m["pages"] == info["pages"] and m["pages_free"] == m["pages"]  # every finished row gave its pages back
    # While a long request decodes, /metrics counts the pages its kept tokens hold: at most what task generate's
    # cache holds at the end of the same request (every head's kept tokens rounded up to pages), which is well
    # under what the same tokens would hold uncompressed.
    prompt, held, done = "a long one " * 2, [], threading.Event()

    def watch():
        while not done.is_set():
            held.append(m["pages"] - dms.metrics()["pages_free"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = _complete(dms, prompt, max_tokens=120, extra_body={"ignore_eos": True})
    finally:
        done.set()
        watcher.join()
    text, stats = _generate(dms, prompt, 120)
    assert out.choices[0].text == text
    assert float(stats["compression_ratio"]) > 1.5  # the model evicts: this is not the dense cache in disguise
    final = int(np.sum(np.ceil(np.asarray(stats["kept_LBK"]) / PAGE)))
    assert final < 0.7 * 4 * np.ceil((22 + 120) / PAGE)
    assert 0 < max(held) <= final and dms.metrics()["pages_free"] == m["pages"]
    assert int(dms.engine.state["refused"][0]) == 0  # no decode step ever found the pool empty


def test_auto_serves_a_dms_model_directory_with_the_paged_dms_cache(dms, dms_dir):
    config = _dms_config(dms_dir, *SERVE)
    assert config.cache.method == "auto" and model_method.resolve(config).name == "dms"
    method = serve.serving_method(config)
    assert isinstance(method, DMSPagedCache) and method.target_cr == 2.0 and method.dms.window == WINDOW
    config.cache.method = "dms"  # asked for by name: the per-head buffers, as asked
    assert type(serve.serving_method(config)).__name__ == "DMSCache"
    server = Server(_dms_config(dms_dir, *SERVE))
    try:
        assert server.info["cache_method"] == "dms_paged"
        assert (server.info["rows"], server.info["pages"]) == (dms.info["rows"], dms.info["pages"])
        prompt = "Prompt number 1: abc"
        assert _complete(server, prompt, max_tokens=24).choices[0].text == _complete(dms, prompt, max_tokens=24) \
            .choices[0].text
    finally:
        server.close()
    # rows derived from the budget: at the same bytes the pool sized for the model's CR 2 holds more sequences
    # than the dense cache (6 rather than 4 at 0.5 MiB)
    dense = size(registry.build("dense", config.cache, None), server.model.cfg, 0.5, 256)
    assert size(method, server.model.cfg, 0.5, 256).rows > dense.rows == 4


def test_the_query_prompt_rule_serves_as_task_generate_does_alone_and_among_concurrent_requests(dms_dir):
    server = Server(_dms_config(dms_dir, "--config.cache.method=dms_paged", "--config.cache.dms_paged.prompt=query",
                                *SERVE))
    try:
        assert server.engine.method.prompt == "query"
        prompts = [f"Question {i}: what was said first? " + "xyz" * (3 * i) for i in range(3)]
        alone = [_complete(server, p, max_tokens=12).choices[0].text for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda p: _complete(server, p, max_tokens=12).choices[0].text, prompts))
        assert together == alone
        assert [_generate(server, p, 12)[0] for p in prompts] == alone
        assert server.metrics()["pages_free"] == server.info["pages"]
    finally:
        server.close()


def test_a_dms_pool_too_small_for_the_load_queues_and_preempts_and_every_request_completes(dms):
    # 8 requests, 6 rows: two wait; the 6 admitted grow to ~28 pages each (the model keeps about half its tokens)
    # in a pool of 144: the youngest rows are preempted and requeued; all finish with their full length, the same
    # greedy text, and no decode step ever finds the pool empty
    assert (dms.info["rows"], dms.info["pages"]) == (6, 144)
    before = dms.metrics()
    prompts = [f"request {i} " * 2 for i in range(8)]
    kw = dict(max_tokens=80, extra_body={"ignore_eos": True})
    alone = _complete(dms, prompts[-1], **kw).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: _complete(dms, p, **kw), prompts))
    assert all(o.usage.completion_tokens == 80 and o.choices[0].finish_reason == "length" for o in outs)
    assert outs[-1].choices[0].text == alone  # preemption and recomputation do not change greedy text
    m = dms.metrics()
    assert m["requests_waited_total"] - before["requests_waited_total"] >= 2 and m["peak_active_sequences"] == 6
    assert m["preemptions_total"] - before["preemptions_total"] >= 1
    assert m["pages_free"] == m["pages"] and m['requests_total{outcome="error"}'] == 0
    assert int(dms.engine.state["refused"][0]) == 0 and int(dms.engine.state["refused"][1]) == 0
