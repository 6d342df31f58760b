"""The OpenAI-compatible HTTP API over an Engine (FastAPI): completions, chat completions, models, health, metrics.

    POST /v1/completions       prompt (a string or token ids) -> text; "stream": true for server-sent events
    POST /v1/chat/completions  messages, rendered by the model's chat template -> an assistant message; streams too
    GET  /v1/models            the one served model
    GET  /health               200 while the engine runs, 503 after it failed
    GET  /metrics              Prometheus text (metrics.py)

Sampling fields: temperature (0 = greedy), top_p, max_tokens (max_completion_tokens for chat), stop, seed, and
two vLLM extensions: top_k (0 or -1 = off) and ignore_eos. n > 1, logprobs, echo and best_of are refused (400).
Errors are OpenAI's JSON: {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, List, Optional, Union

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from dmc_jax.serving import metrics
from dmc_jax.serving.engine import Engine, Request


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def _error(status, message, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of newer API versions are ignored, as OpenAI-compatible servers do
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1, le=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    ignore_eos: bool = False
    logprobs: Any = None
    best_of: Optional[int] = Field(None, ge=1, le=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int]]
    echo: bool = Field(False, le=False)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Optional[Union[str, List[dict]]] = ""


class ChatRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


def create_app(engine: Engine, model_name: str) -> FastAPI:
    app = FastAPI(title="dmc_jax", description="OpenAI-compatible serving of KV-cache-compressed models")
    tok, capacity = engine.tokenizer, engine.capacity
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {err.get('msg', '')}", None, "invalid_json")
        param = ".".join(loc) or None
        return _error(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param, "invalid_value")

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.code, exc.kind)

    @app.get("/health")
    async def health():
        snap = engine.snapshot()
        if not snap["alive"]:
            return JSONResponse({"status": "error", "error": engine.error}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dmc_jax", "max_model_len": capacity}]}

    def check_model(body: _Sampling):
        if body.model != model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_name}`",
                           "model", "model_not_found")

    def make_request(body: _Sampling, prompt: list, max_tokens: Optional[int], param: str) -> Request:
        if not prompt:
            raise APIError(400, f"the {param} is empty", param, "invalid_value")
        if len(prompt) >= capacity:
            raise APIError(400, f"This model's maximum context length is {capacity} tokens; your {param} has "
                                f"{len(prompt)} tokens. Shorten it.", param, "context_length_exceeded")
        if max_tokens is None:
            max_tokens = capacity - len(prompt)
        if len(prompt) + max_tokens > capacity:
            raise APIError(400, f"This model's maximum context length is {capacity} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the {param}, {max_tokens} for "
                                f"the completion). Reduce the length of the {param} or max_tokens.",
                           "max_tokens", "context_length_exceeded")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Request(prompt=prompt, max_tokens=max_tokens, emit=lambda *a: None, temperature=body.temperature,
                       top_p=body.top_p, top_k=max(body.top_k, 0), seed=body.seed, stop=stop,
                       ignore_eos=body.ignore_eos)

    async def run(http: HTTPRequest, r: Request, kind: str, stream: bool, include_usage: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        r.emit = lambda k, x: loop.call_soon_threadsafe(events.put_nowait, (k, x))
        try:
            engine.submit(r)
        except RuntimeError as e:
            raise APIError(503, f"the engine stopped: {e}", None, "engine_error", "server_error")
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        usage = lambda: {"prompt_tokens": len(r.prompt), "completion_tokens": len(r.generated),
                         "total_tokens": len(r.prompt) + len(r.generated)}
        if not stream:
            parts = []
            try:
                while True:
                    try:
                        k, x = await asyncio.wait_for(events.get(), 1.0)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            engine.cancel(r)
                            return JSONResponse({}, 499)
                        continue
                    if k == "text":
                        parts.append(x)
                    else:
                        break
            except asyncio.CancelledError:
                engine.cancel(r)
                raise
            if x.startswith("error"):
                return _error(500, x, None, "engine_error", "server_error")
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": x,
                       "logprobs": None} if kind == "chat" else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": x})
            return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                    "created": now, "model": model_name, "choices": [choice], "usage": usage()}

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(delta_text: Optional[str], finish: Optional[str], first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else (
                    {"content": delta_text} if delta_text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        async def sse():
            try:
                if kind == "chat":
                    yield chunk(None, None, first=True)
                while True:
                    k, x = await events.get()
                    if k == "text":
                        yield chunk(x, None)
                        continue
                    if x.startswith("error"):
                        yield f"data: {json.dumps({'error': {'message': x, 'type': 'server_error'}})}\n\n"
                    else:
                        yield chunk(None, x)
                    break
                if include_usage:
                    body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [],
                            "usage": usage()}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or we are done): the row is freed at the next step
                if r.finish_reason is None:
                    engine.cancel(r)

        return StreamingResponse(sse(), media_type="text/event-stream")

    def include_usage(body: _Sampling) -> bool:
        return bool((body.stream_options or {}).get("include_usage"))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (send a list of one string, or several requests)",
                               "prompt", "unsupported")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            if any(not 0 <= t < engine.cfg.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {engine.cfg.vocab_size})", "prompt",
                               "invalid_value")
            ids = list(prompt)
        r = make_request(body, ids, body.max_tokens if body.max_tokens is not None else 16, "prompt")
        return await run(http, r, "completion", body.stream, include_usage(body))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: HTTPRequest):
        check_model(body)
        messages = []
        for m in body.messages:
            content = m.content or ""
            if isinstance(content, list):  # content parts: the text ones
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            messages.append({"role": m.role, "content": content})
        try:
            text = tok.apply_chat_template(messages)
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the model's chat template rejects these messages: {e}", "messages",
                           "invalid_value") from None
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        r = make_request(body, tok.encode(text), limit, "messages")
        return await run(http, r, "chat", body.stream, include_usage(body))

    return app
