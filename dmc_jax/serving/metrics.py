"""The engine's state as Prometheus text (exposition format 0.0.4), for GET /metrics."""

from __future__ import annotations

import numpy as np

PREFIX = "dmc_serve_"


def render(engine) -> str:
    snap, m = engine.snapshot(), engine.metrics
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {PREFIX}{name} {help_}")
        lines.append(f"# TYPE {PREFIX}{name} {kind}")
        for labels, value in samples:
            text = "NaN" if value != value else f"{value:g}" if isinstance(value, float) else str(value)
            lines.append(f"{PREFIX}{name}{labels} {text}")

    metric("queue_length", "gauge", "Requests waiting for a row (or pool pages).", [("", snap["queue"])])
    metric("active_sequences", "gauge", "Sequences decoding now.", [("", snap["active"])])
    metric("peak_active_sequences", "gauge", "Most sequences decoding at once since start.", [("", m.peak_active)])
    metric("rows", "gauge", "Rows of the cache (sequences that can decode at once).", [("", snap["rows"])])
    metric("rows_free", "gauge", "Rows free for a new sequence.", [("", snap["rows_free"])])
    if snap["pages"]:
        metric("pages", "gauge", "Pages of the paged cache's pool.", [("", snap["pages"])])
        metric("pages_free", "gauge", "Pool pages free.", [("", snap["pages_free"])])
    metric("cache_bytes", "gauge", "Bytes the cache allocated.", [("", engine.sizing.bytes)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", m.generated_tokens)])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled (first admission).", [("", m.prompt_tokens)])
    metric("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
           [("", float(m.tokens_per_second()))])
    metric("requests_total", "counter", "Requests finished, by outcome.",
           [(f'{{outcome="{k}"}}', m.requests.get(k, 0)) for k in ("completed", "cancelled", "error")])
    metric("requests_waited_total", "counter", "Requests that waited in the queue because the cache was full.",
           [("", m.waited)])
    metric("preemptions_total", "counter", "Rows preempted because the page pool ran short (requeued).",
           [("", m.preempted)])
    ttft = np.array(list(m.ttft), np.float64)
    samples = [(f'{{quantile="{q}"}}', float(np.quantile(ttft, q)) if ttft.size else float("nan"))
               for q in (0.5, 0.95)]
    metric("time_to_first_token_seconds", "summary", "Time from arrival to the first token (last 2048 requests).",
           samples + [("_sum", float(ttft.sum())), ("_count", int(ttft.size))])  # suffixes of the name
    return "\n".join(lines) + "\n"
