"""Task serve: a real server on 127.0.0.1 (tiny random model) driven by the real `openai` client: completions and
chat, streaming, concurrency, OpenAI-style 4xx errors, a cache too small for the load (requests queue, the paged
pool preempts, all complete), a client that disconnects mid-stream (its row is freed), and greedy text that equals
task generate's whatever else is in the batch."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import pytest

openai = pytest.importorskip("openai")

from dmc_jax.cache import model_method  # noqa: E402
from dmc_jax.config_loader import parse_argv  # noqa: E402
from dmc_jax.config_schema import validate  # noqa: E402
from dmc_jax.errors import UserError  # noqa: E402
from dmc_jax.inference.generate import GenerateConfig, generate  # noqa: E402
from dmc_jax.tasks import common, serve  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "smollm2.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(*overrides):
    config = parse_argv(["--config", CONFIG, "--config.task=serve", "--config.model.source=tiny",
                         "--config.model.max_seq_len=0", f"--config.serve.port={_free_port()}", *overrides])
    validate(config)
    return config


class Server:
    """A server of `config` in a thread of this process (`model`: already loaded, else config.model.source's)."""

    def __init__(self, config, model=None):
        self.config = config
        self.model = model or common.load_model(config)
        self.engine, self.server, self.info = serve.build(config, self.model)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{config.serve.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict:
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.replace("dmc_serve_", "")] = float(value)
        return out

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def dense():
    server = Server(_config("--config.cache.method=dense", "--config.serve.cache_mb=2"))
    yield server
    server.close()


def _complete(server, prompt, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0.0)
    return server.client.completions.create(model="tiny", prompt=prompt, **kw)


def test_completion_and_chat_and_models(dense):
    assert [m.id for m in dense.client.models.list().data] == ["tiny"]
    out = _complete(dense, "Hello there", max_tokens=7, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 7
    assert out.usage.prompt_tokens == len("Hello there")
    chat = dense.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5
    # the chat template is the model's: the byte tokenizer renders "user: hi\nassistant: "
    assert chat.usage.prompt_tokens == len("user: hi\nassistant: ")
    assert httpx.get(dense.url + "/health").json() == {"status": "ok"}


def test_greedy_text_equals_task_generate_alone_and_in_a_batch_of_8(dense):
    prompts = [f"Prompt number {i}: " + "abc" * i for i in range(8)]
    alone = [_complete(dense, p).choices[0].text for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _complete(dense, p).choices[0].text, prompts))
    assert together == alone
    assert dense.metrics()["peak_active_sequences"] >= 2
    tok, model = dense.model.tokenizer, dense.model
    method = model_method.make(dense.config)
    for prompt, text in zip(prompts[:3], alone):
        gen = generate(model.params, [tok.encode(prompt)], model.cfg, method,
                       GenerateConfig(max_new_tokens=12, stop_ids=tuple(tok.stop_ids)), jax.random.PRNGKey(0))
        assert text == tok.decode([t for t in gen.tokens[0] if t not in tok.stop_ids])


def test_streaming_completion_and_chat_give_the_same_text(dense):
    kw = dict(max_tokens=10, extra_body={"ignore_eos": True})
    whole = _complete(dense, "Stream me", **kw).choices[0].text
    chunks = list(_complete(dense, "Stream me", stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole and chunks[-1].choices[0].finish_reason == "length"
    stream = dense.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "yo"}],
                                                  stream=True, temperature=0, stream_options={"include_usage": True},
                                                  **kw)
    parts = list(stream)
    assert parts[-1].usage.completion_tokens == 10
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "length"


def test_seeded_sampling_and_stop_strings(dense):
    kw = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, extra_body={"ignore_eos": True, "top_k": 50})
    a = _complete(dense, "seeded", **kw).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        rest = list(pool.map(lambda p: _complete(dense, p, **kw).choices[0].text, ["seeded", "other", "seeded"]))
    assert rest[0] == a == rest[2]
    text = _complete(dense, "stop here", max_tokens=20, extra_body={"ignore_eos": True}).choices[0].text
    at = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2] and text.find(text[i:i + 2]) == i)
    cut = _complete(dense, "stop here", max_tokens=20, stop=[text[at:at + 2]], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[:at] and cut.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(dense):
    r = httpx.post(dense.url + "/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        dense.client.completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as e:
        _complete(dense, "hello", max_tokens=300)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="maximum context length") as e:
        _complete(dense, "x" * 300, max_tokens=1)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        _complete(dense, "hello", temperature=-0.5)
    assert e.value.body["param"] == "temperature" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        dense.client.chat.completions.create(model="tiny", messages=[], max_tokens=3)
    assert _complete(dense, "still alive", max_tokens=3).usage.completion_tokens >= 1


def test_a_client_that_disconnects_mid_stream_frees_its_row(dense):
    before = dense.metrics()
    stream = _complete(dense, "long one", max_tokens=240, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        m = dense.metrics()
        if m['requests_total{outcome="cancelled"}'] > before['requests_total{outcome="cancelled"}'] and \
                m["active_sequences"] == 0:
            break
        time.sleep(0.05)
    assert m['requests_total{outcome="cancelled"}'] == before['requests_total{outcome="cancelled"}'] + 1
    assert m["rows_free"] == m["rows"] and m["active_sequences"] == 0
    assert m["generated_tokens_total"] - before["generated_tokens_total"] < 240


def test_a_pool_too_small_for_the_load_queues_and_preempts_and_every_request_completes():
    # DMC paged, rows sized for CR 4 but the random model barely compresses: the pool runs short, rows are
    # preempted and requeued, requests wait; all finish with their full length and nothing overflows.
    server = Server(_config("--config.cache.method=dmc_paged", "--config.cache.dmc_paged.target_cr=4.0",
                            "--config.serve.cache_mb=0.3", "--config.serve.min_prompt_bucket=64"))
    try:
        assert server.info["pages"] and server.info["rows"] >= 2
        prompts = [f"request {i} " * 4 for i in range(8)]
        kw = dict(max_tokens=48, extra_body={"ignore_eos": True})
        alone = _complete(server, prompts[0], **kw).choices[0].text
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda p: _complete(server, p, **kw), prompts))
        assert all(o.usage.completion_tokens == 48 and o.choices[0].finish_reason == "length" for o in outs)
        assert outs[0].choices[0].text == alone  # preemption and recomputation do not change greedy text
        m = server.metrics()
        assert m["requests_waited_total"] >= 1 and m["peak_active_sequences"] <= server.info["rows"]
        assert m["preemptions_total"] >= 1  # 8 rows of ~90 uncompressed tokens need ~190 pages; the pool has 130
        assert m["pages_free"] == m["pages"] and m['requests_total{outcome="error"}'] == 0
        assert int(server.engine.state["refused"][0]) == 0  # no decode step ever found the pool empty
    finally:
        server.close()


def test_serve_config_is_validated_at_start():
    with pytest.raises(UserError, match="serve.port"):
        _config("--config.serve.port=0")
    with pytest.raises(UserError, match="serve.cache_mb"):
        _config("--config.serve.cache_mb=-1")
    config = _config("--config.serve.cache_mb=0.1", "--config.cache.method=dense")
    with pytest.raises(UserError, match="holds 0 sequences"):
        serve.build(config, common.load_model(config))


def test_the_cli_serves_until_ctrl_c(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dmc_jax.main", "--config", CONFIG, "--config.task=serve",
                             "--config.model.source=tiny", "--config.model.max_seq_len=0", "--config.serve.cache_mb=1",
                             f"--config.serve.port={port}", f"--config.output_dir={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    results = json.load(open(tmp_path / "results.json"))["results"]
    assert results["requests"] == {"completed": 1} and results["rows"] == 8  # 1 MiB / 128 KiB a row
