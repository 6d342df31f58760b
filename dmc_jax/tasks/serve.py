"""Task `serve`: an OpenAI-compatible HTTP server (dmc_jax/serving) over the configured model and cache method.

    python -m dmc_jax.main --config configs/smollm2.py --config.task=serve --config.serve.port=8000 \
        [--config.model.source=<model dir>] [--config.cache.method=...] [--config.serve.cache_mb=512]

The cache gets serve.cache_mb MiB: the engine derives how many sequences of serve.max_tokens tokens decode at once
(and, for a paged cache, the pool's pages). With cache.method=auto a model directory whose method has a paged
variant for the same trained section is served with it (a DMS model, method 'dms', with dms_paged): the engine
admits by pages and sizes its rows for the model's CR. Ctrl-C stops the server; results.json summarises what it
served.
"""

from __future__ import annotations

import os
import socket
import time

import ml_collections

from dmc_jax.cache import model_method, registry
from dmc_jax.errors import UserError
from dmc_jax.serving.sizing import MIB, is_paged, size


def model_name(config: ml_collections.ConfigDict) -> str:
    return config.serve.model_name or os.path.basename(os.path.normpath(str(config.model.source))) or "model"


def build(config: ml_collections.ConfigDict, model, warm: bool = True):
    """(engine started, uvicorn.Server not yet running, a summary dict) for config.serve."""
    import uvicorn

    from dmc_jax.serving.api import create_app
    from dmc_jax.serving.engine import Engine

    s = config.serve
    max_tokens = s.max_tokens or model.cfg.max_seq_len
    if max_tokens > model.cfg.max_seq_len:
        raise UserError(f"serve.max_tokens={max_tokens} exceeds model.max_seq_len={model.cfg.max_seq_len}; lower it "
                        f"(0 = model.max_seq_len)")
    _check_port(s.host, s.port)
    sizing = size(serving_method(config), model.cfg, s.cache_mb, max_tokens, s.max_rows)
    engine = Engine(model.params, model.cfg, model.tokenizer, sizing, s.min_prompt_bucket, config.get("seed", 0))
    engine.start(warm=warm)
    name = model_name(config)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name), host=s.host, port=s.port, log_level=s.log_level,
                                           timeout_graceful_shutdown=5))
    info = {"model": name, "cache_method": sizing.method.name, "rows": sizing.rows, "pages": sizing.pages,
            "max_tokens": max_tokens, "cache_mib": sizing.bytes / MIB, "url": f"http://{s.host}:{s.port}/v1"}
    return engine, server, info


def serving_method(config: ml_collections.ConfigDict):
    """The run's cache method; for cache.method=auto, a trained method's engine_method when it names one (a DMS
    model directory: dms -> dms_paged, one page pool for every head), built from the same model directory."""
    resolved = model_method.resolve(config)
    method = resolved.make()
    if config.cache.get("method", registry.AUTO) != registry.AUTO or is_paged(method):
        return method
    trained = registry.get(resolved.name).trained
    if trained is not None and trained.engine_method:
        return model_method.resolve(config, trained.engine_method).make()
    return method


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on serve.host={host} serve.port={port} ({e.strerror}); pick another "
                        f"serve.port or stop what uses it") from None


def run(config: ml_collections.ConfigDict, model) -> dict:
    engine, server, info = build(config, model)
    print(f"serving {info['model']} with cache.method={info['cache_method']}: {info['rows']} rows of "
          f"{info['max_tokens']} tokens" + (f", a pool of {info['pages']} pages" if info["pages"] else "") +
          f", {info['cache_mib']:.1f} MiB of cache; OpenAI API at {info['url']} (Ctrl-C stops)", flush=True)
    start = time.perf_counter()
    try:
        server.run()  # returns on SIGTERM after a graceful shutdown
    except KeyboardInterrupt:  # Ctrl-C: uvicorn shuts down gracefully, then re-raises it
        print("stopped by Ctrl-C", flush=True)
    finally:
        engine.stop()
    m = engine.metrics
    return {**info, "served_seconds": time.perf_counter() - start, "requests": dict(m.requests),
            "generated_tokens": m.generated_tokens, "peak_active_sequences": m.peak_active,
            "preemptions": m.preempted, "engine_error": engine.error}
