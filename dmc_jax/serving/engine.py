"""A continuous-batching engine over any cache method: a fixed cache of R rows, one decode step for all of them.

One thread owns the cache. Between decode steps it frees the rows whose request finished or was cancelled, admits
queued requests into free rows (one prefill each, prompts padded to buckets b, 1.5b, 2b, 3b, ...), then runs ONE jitted
decode step over every row (steps.py). Requests wait in a FIFO queue while no row is free; nothing fails because
the server is busy.

A paged method (the DMC or DMS pool) also admits by pages: a prompt is admitted when the pool keeps, after its
expected pages (Sizing.expected_pages), one page per (layer, KV head) of every active row (the most one decode step
can take: a DMC or DMS step adds at most one token per head). Before each step the same reserve is checked; when
the rows outgrow the pool the youngest row is preempted: its pages go back and its request returns to the head of
the queue with its tokens so far, to be prefilled again (the vLLM policy). A prompt that finds fewer pages than it
needs is rolled back the same way. The pool therefore never overflows.

Each row has its own sampling parameters (arrays: nothing recompiles per request) and its own random key
(seed, token index), so a row's tokens never depend on what else is in the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.serving import steps
from dmc_jax.serving.sizing import Sizing
from dmc_jax.serving.text import TextStream

_ids = itertools.count()


@dataclasses.dataclass
class Request:
    """One completion. `emit(kind, payload)` is called from the engine thread: ('text', delta) as text is ready,
    then ('done', finish_reason) with finish_reason 'stop' | 'length' | 'cancelled' | 'error: <why>'."""

    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    id: int = dataclasses.field(default_factory=lambda: next(_ids))
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: Optional[float] = None
    generated: list = dataclasses.field(default_factory=list)
    cancelled: bool = False
    waited: bool = False
    finish_reason: Optional[str] = None
    text: Optional[TextStream] = None


class Metrics:
    """Counters the /metrics endpoint reports (written by the engine thread, read by the server)."""

    def __init__(self):
        self.requests = collections.Counter()   # outcome -> count
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.waited = 0
        self.preempted = 0
        self.peak_active = 0
        self.ttft: collections.deque = collections.deque(maxlen=2048)
        self.recent: collections.deque = collections.deque()  # (time, tokens) of the last window

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else window
        return sum(n for _, n in recent) / span


class Engine:
    """Serves Requests from one cache of sizing.rows rows (see the module docstring)."""

    def __init__(self, params, cfg, tokenizer, sizing: Sizing, min_bucket: int = 32, seed: int = 0):
        self.params, self.cfg, self.tokenizer, self.sizing = params, cfg, tokenizer, sizing
        self.method, self.rows, self.capacity = sizing.method, sizing.rows, sizing.max_tokens
        self.min_bucket = min_bucket
        self.stop_ids = frozenset(int(i) for i in tokenizer.stop_ids)
        self.metrics = Metrics()
        self.queue: collections.deque = collections.deque()
        self.active: dict = {}                    # row -> Request
        self.free: list = list(range(self.rows))
        self.pages_free = sizing.pages if sizing.pages else -1
        self.pool_blocked = False                 # a prompt found no pages: wait until pages come back
        self.error: Optional[str] = None
        self._lock = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._rng = random.Random(seed)
        R = self.rows
        self.tokens_R = np.zeros(R, np.int32)
        self.positions_R = np.zeros(R, np.int32)
        self.sampling = {name: np.zeros(R, dtype) for name, dtype in
                         (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32),
                          ("seed", np.uint32), ("counter", np.int32))}
        self.sampling["top_p"][:] = 1.0
        self.state = None

    # ----------------------------------------------------------------------------------------------- client side
    def submit(self, request: Request) -> Request:
        """Queues a request (thread-safe); its prompt + max_tokens must fit a row (the server checks)."""
        if len(request.prompt) + request.max_tokens > self.capacity or not request.prompt:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + {request.max_tokens} does not fit a row of "
                             f"{self.capacity} tokens")
        if request.seed is None:
            request.seed = self._rng.getrandbits(31)
        request.text = TextStream(self.tokenizer, request.stop)
        with self._lock:
            if self.error:
                raise RuntimeError(self.error)
            self.queue.append(request)
            self._lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """The client went away: the request leaves the queue or frees its row at the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify_all()

    def snapshot(self) -> dict:
        with self._lock:
            return {"queue": len(self.queue), "active": len(self.active), "rows": self.rows,
                    "rows_free": len(self.free), "pages": self.sizing.pages, "pages_free": self.pages_free,
                    "alive": self._thread is not None and self._thread.is_alive() and not self.error}

    # ------------------------------------------------------------------------------------------------ lifecycle
    def start(self, warm: bool = True) -> "Engine":
        self.state = jax.jit(self.method.init, static_argnums=(0, 1, 2))(self.cfg, self.rows, self.capacity)
        if warm:  # compile the decode step before the first request
            self._decode()
        self._thread = threading.Thread(target=self._loop, name="dmc-serve-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not self.active and not self._admissible():
                        self._lock.wait(0.5)
                        self._drop_cancelled_queued()
                    if self._stop:
                        break
                self._step()
        except Exception as e:  # the engine is dead: every request learns it, /health says it
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            with self._lock:
                pending = list(self.active.values()) + list(self.queue)
                self.active.clear()
                self.queue.clear()
            for r in pending:
                self._finish_request(r, f"error: {self.error}" if self.error else "cancelled")

    # ------------------------------------------------------------------------------------------------ scheduling
    def _admissible(self) -> bool:
        return bool(self.queue) and bool(self.free) and not self.pool_blocked

    def _drop_cancelled_queued(self) -> None:
        for r in [r for r in self.queue if r.cancelled]:
            self.queue.remove(r)
            self._finish_request(r, "cancelled")

    def _step(self) -> None:
        for row, r in list(self.active.items()):
            if r.cancelled:
                self._release(row, "cancelled")
        with self._lock:
            self._drop_cancelled_queued()
        self._admit()
        if not self.active:
            return
        self._reserve_pages()
        next_R = self._decode()
        now = time.perf_counter()
        count = 0
        for row, r in list(self.active.items()):
            count += 1
            self._accept(row, r, int(next_R[row]), now)
        self.metrics.generated_tokens += count
        self.metrics.recent.append((now, count))
        while self.metrics.recent and now - self.metrics.recent[0][0] > 60:
            self.metrics.recent.popleft()

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._admissible():
                    for r in self.queue:  # they wait for a row or pages
                        if not r.waited:
                            r.waited = True
                            self.metrics.waited += 1
                    return
                r = self.queue[0]
                if self.sizing.pages and self.active and not self._pages_for(len(r.prompt) + len(r.generated)):
                    self.pool_blocked = True  # until a row gives its pages back
                    continue
                self.queue.popleft()
                row = self.free.pop(0)
            self._prefill(row, r)

    def _pages_for(self, tokens: int) -> bool:
        s = self.sizing
        return self.pages_free - s.heads * (len(self.active) + 1) >= s.expected_pages(tokens)

    def _reserve_pages(self) -> None:
        """Paged: preempts the youngest rows until one step of every active row's heads surely finds a page."""
        while self.sizing.pages and self.pages_free < self.sizing.heads * len(self.active) and len(self.active) > 1:
            row = max(self.active, key=lambda b: self.active[b].arrived)
            r = self.active[row]
            self._release(row, None)
            self.metrics.preempted += 1
            with self._lock:
                self.queue.appendleft(r)

    # ------------------------------------------------------------------------------------------------ device work
    def _bucket(self, n: int) -> int:
        """Padded prompt length: b, 1.5b, 2b, 3b, 4b, ... from b = min_bucket (at most 1/3 padding, a few shapes)."""
        b = self.min_bucket
        while True:
            for size in (b, b + b // 2):
                if size >= n:
                    return min(size, self.capacity)
            b *= 2

    def _set_sampling(self, row: int, r: Request) -> None:
        s = self.sampling
        s["temperature"][row], s["top_k"][row], s["top_p"][row] = r.temperature, r.top_k, r.top_p
        s["seed"][row], s["counter"][row] = r.seed, len(r.generated)

    def _prefill(self, row: int, r: Request) -> None:
        ids = list(r.prompt) + list(r.generated)  # a preempted request resumes with its tokens so far
        T = self._bucket(len(ids))
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :len(ids)] = ids
        self._set_sampling(row, r)
        sampling = tuple(jnp.asarray(v[row:row + 1]) for v in self.sampling.values())
        first, self.state, lost, pages = steps.prefill_row(
            self.params, tokens, np.array([len(ids)], np.int32), np.array([row], np.int32), self.state, sampling,
            self.method, self.cfg)
        self.pages_free = int(pages)
        if not r.generated:
            self.metrics.prompt_tokens += len(r.prompt)
        if int(lost):
            self.state, pages = steps.free_row(self.state, np.array([row], np.int32), self.method)
            self.pages_free = int(pages)
            with self._lock:
                self.free.append(row)
                self.free.sort()
                if self.sizing.pages and self.active:  # rolled back: it waits for pages to come back
                    self.pool_blocked = True
                    self.queue.appendleft(r)
                    return
            self._finish_request(r, f"error: the cache has no room for a prompt of {len(ids)} tokens "
                                    f"(cache.method={self.method.name}); raise serve.cache_mb")
            return
        with self._lock:
            self.active[row] = r
            self.metrics.peak_active = max(self.metrics.peak_active, len(self.active))
        self.positions_R[row] = len(ids)
        self._accept(row, r, int(first[0]), time.perf_counter())
        self.metrics.generated_tokens += 1
        self.metrics.recent.append((time.perf_counter(), 1))

    def _decode(self) -> np.ndarray:
        active = np.zeros(self.rows, bool)
        active[list(self.active)] = True
        sampling = tuple(jnp.asarray(v) for v in self.sampling.values())
        next_R, self.state, pages = steps.decode_rows(self.params, self.tokens_R, self.positions_R, active,
                                                      self.state, sampling, self.method, self.cfg)
        self.pages_free = int(pages)
        return np.asarray(next_R)

    def _accept(self, row: int, r: Request, token: int, now: float) -> None:
        """A new token of row `row`: streamed, fed back next step, or the end of the request."""
        if r.first_token_at is None:
            r.first_token_at = now
            self.metrics.ttft.append(now - r.arrived)
        if token in self.stop_ids and not r.ignore_eos:
            r.generated.append(token)
            self._release(row, "stop")
            return
        r.generated.append(token)
        delta, stopped = r.text.add(token)
        if delta:
            r.emit("text", delta)
        if stopped:
            self._release(row, "stop")
        elif len(r.generated) >= r.max_tokens:
            self._release(row, "length")
        else:
            self.tokens_R[row] = token
            self.positions_R[row] = len(r.prompt) + len(r.generated) - 1
            self.sampling["counter"][row] = len(r.generated)

    def _release(self, row: int, reason: Optional[str]) -> None:
        """Frees the row at once (pages back to the pool); reason None = preempted (the request is not done)."""
        self.state, pages = steps.free_row(self.state, np.array([row], np.int32), self.method)
        self.pages_free = int(pages)
        with self._lock:
            r = self.active.pop(row)
            self.free.append(row)
            self.free.sort()
            self.pool_blocked = False
        if reason is not None:
            self._finish_request(r, reason)

    def _finish_request(self, r: Request, reason: str) -> None:
        if r.finish_reason is not None:
            return
        if reason in ("stop", "length"):
            rest = r.text.finish()
            if rest:
                r.emit("text", rest)
        r.finish_reason = reason
        self.metrics.requests["cancelled" if reason == "cancelled" else
                              "error" if reason.startswith("error") else "completed"] += 1
        r.emit("done", reason)
