"""The `serve` config section (task serve): where the HTTP server listens and the cache memory it may use."""

from __future__ import annotations

import ml_collections

from dmc_jax.errors import require

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.host = "127.0.0.1"      # interface to listen on ('0.0.0.0' = every interface; there is no authentication)
    c.port = 8000
    c.cache_mb = 512.0        # KV-cache memory of all sequences together, MiB: the engine derives rows / pages from it
    c.max_tokens = 0          # tokens per sequence (prompt + completion); 0 = model.max_seq_len
    c.max_rows = 0            # sequences decoding at once; 0 = as many as cache_mb holds (>0: exactly this many)
    c.model_name = ""         # the id clients send as `model`; '' = the last part of model.source
    c.min_prompt_bucket = 32  # prompts are padded to b, 1.5b, 2b, 3b, 4b, ... from b = this (a few prefill shapes)
    c.log_level = "warning"   # uvicorn's log level: critical | error | warning | info | debug | trace
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    require(isinstance(c.host, str) and c.host.strip() != "", f"serve.host must be an interface name or address; "
            f"got {c.host!r}")
    require(isinstance(c.port, int) and 1 <= c.port <= 65535, f"serve.port must be in [1, 65535]; got {c.port!r}")
    require(c.cache_mb > 0, f"serve.cache_mb must be > 0 (MiB of KV cache for all sequences); got {c.cache_mb}")
    require(c.max_tokens >= 0, f"serve.max_tokens must be >= 0 (0 = model.max_seq_len); got {c.max_tokens}")
    require(c.max_rows >= 0, f"serve.max_rows must be >= 0 (0 = as many as serve.cache_mb holds); got {c.max_rows}")
    b = c.min_prompt_bucket
    require(isinstance(b, int) and b >= 1 and b & (b - 1) == 0,
            f"serve.min_prompt_bucket must be a power of two >= 1; got {b!r}")
    require(c.log_level in LOG_LEVELS, f"serve.log_level must be one of {', '.join(LOG_LEVELS)}; got {c.log_level!r}")
