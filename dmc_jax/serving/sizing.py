"""How many sequences (rows) and, for a paged method, how many pool pages fit in the serving memory budget.

A method's bytes come from the shapes its `init` would allocate (jax.eval_shape: nothing is allocated here). A
method whose state has shared leaves and a `pages` field (the paged DMC and DMS caches) keeps a pool: its rows are
sized for the method's expected compression (target_cr; 1 when unknown) and the pool takes the rest of the budget,
so at CR c about c times as many rows fit as with the dense cache. A head of a DMS cache keeps its last w + 1
tokens whatever its CR (a marked token stays visible for w more steps), so it is expected to keep
w + 1 + (t - w - 1) / c of t tokens. Every other method takes a fixed slice of the budget per row. The pool always
holds at least one uncompressed sequence plus one decode step of every head, so a request admitted alone always
completes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig

MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class Sizing:
    """The engine's cache: `method` (its pool fixed, for a paged method), `rows` sequences of `max_tokens`."""

    method: CacheMethod
    rows: int
    max_tokens: int
    bytes: int                 # what method.init(cfg, rows, max_tokens) allocates
    pages: int = 0             # pool pages (0: not a paged method)
    heads: int = 0             # layers x KV heads: pages one decode step of one row may take at most
    expected_cr: float = 1.0   # the CR rows were sized for (paged)
    always_kept: int = 0       # tokens a head keeps whatever its CR (DMS: its window w + 1; paged)
    page_size: int = 1         # slots per page (paged)

    def expected_pages(self, tokens: int) -> int:
        """Pool pages a sequence of `tokens` tokens is expected to hold at expected_cr (every head, rounded up)."""
        uncompressed = min(tokens, self.always_kept)
        kept = uncompressed + (tokens - uncompressed) / self.expected_cr
        return self.heads * math.ceil(kept / self.page_size)


def _bytes(method, cfg: ModelConfig, batch: int, max_tokens: int) -> dict:
    shapes = jax.eval_shape(lambda: method.init(cfg, batch, max_tokens))
    return {name: int(np.prod(x.shape)) * x.dtype.itemsize for name, x in shapes.items()}


def is_paged(method) -> bool:
    return bool(getattr(method, "layout", None) and method.layout.shared) and hasattr(method, "pages") \
        and hasattr(method, "page_size")


def always_kept(method) -> int:
    """Tokens each head of `method` keeps whatever the CR (the method's `always_kept`, e.g. DMS: w + 1); else 0."""
    return int(getattr(method, "always_kept", 0))


def size(method, cfg: ModelConfig, cache_mb: float, max_tokens: int, max_rows: int = 0) -> Sizing:
    """Rows (and pool pages) for `cache_mb` MiB of cache; UserError when not even one sequence fits."""
    budget = int(cache_mb * MIB)
    if is_paged(method):
        return _size_paged(method, cfg, budget, max_tokens, max_rows)
    one, two = sum(_bytes(method, cfg, 1, max_tokens).values()), sum(_bytes(method, cfg, 2, max_tokens).values())
    per_row, fixed = two - one, 2 * one - two
    fits = (budget - fixed) // per_row if per_row else max_rows
    rows = max_rows or fits
    if rows < 1 or rows > fits:
        need = (fixed + max(rows, 1) * per_row) / MIB
        raise UserError(f"serve.cache_mb={cache_mb:g} holds {max(fits, 0)} sequences of serve.max_tokens={max_tokens} "
                        f"with cache.method={method.name} ({per_row / MIB:.2f} MiB each); {max(rows, 1)} need "
                        f"{need:.2f} MiB: raise serve.cache_mb, or lower serve.max_tokens or serve.max_rows")
    return Sizing(method, rows, max_tokens, fixed + rows * per_row)


def _size_paged(method, cfg: ModelConfig, budget: int, max_tokens: int, max_rows: int) -> Sizing:
    N = method.page_size
    shared = set(method.layout.shared)
    b1 = _bytes(dataclasses.replace(method, pages=1), cfg, 1, max_tokens)
    b2 = _bytes(dataclasses.replace(method, pages=2), cfg, 1, max_tokens)
    page_bytes = sum(b2[n] - b1[n] for n in shared)
    fixed = sum(b1[n] for n in shared) - page_bytes
    per_row = sum(v for n, v in b1.items() if n not in shared)
    heads = cfg.num_layers * cfg.num_kv_heads
    worst = heads * math.ceil(max_tokens / N) + heads  # one uncompressed sequence and one step of reserve
    cr = float(getattr(method, "target_cr", 0.0) or 1.0)
    sizing = Sizing(method, 0, max_tokens, 0, heads=heads, expected_cr=cr, always_kept=always_kept(method),
                    page_size=N)
    expected = sizing.expected_pages(max_tokens) + heads  # + the step reserve the engine keeps per row
    rows = max_rows or max(1, (budget - fixed - heads * page_bytes) // (per_row + expected * page_bytes))
    pages = (budget - fixed - rows * per_row) // page_bytes
    while not max_rows and rows > 1 and pages < worst:  # derived rows: fewer, so a lone sequence always fits
        rows -= 1
        pages = (budget - fixed - rows * per_row) // page_bytes
    if pages < worst:
        raise UserError(f"serve.cache_mb={budget / MIB:g} leaves {max(pages, 0)} pages of {N} slots for "
                        f"{rows} rows; cache.method={method.name} needs at least {worst} (one uncompressed sequence "
                        f"of serve.max_tokens={max_tokens}): raise serve.cache_mb, or lower serve.max_tokens or "
                        f"serve.max_rows")
    sized = dataclasses.replace(method, pages=int(pages))
    total = sum(_bytes(sized, cfg, rows, max_tokens).values())
    return dataclasses.replace(sizing, method=sized, rows=int(rows), bytes=total, pages=int(pages))
