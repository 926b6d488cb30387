"""The HTTP side of the server (Starlette on uvicorn, in its own thread of rank 0): routes, API key, limits,
server-sent events, and the bridge to the engine thread (scheduler.EngineLoop).

No MPI here: a request becomes a scheduler.Request whose events come back through the asyncio loop.
A client that goes away sets its request's `cancelled` flag at once (a task waits for the disconnect), so
the engine stops at the next token and the next request starts.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tpi_mpi.serving.metrics import Metrics
from tpi_mpi.serving.protocol import (
    ApiError,
    Params,
    Reply,
    chat_messages,
    completion_prompt,
    error_body,
    parse_params,
    usage,
)
from tpi_mpi.serving.scheduler import (
    Delta,
    EngineLoop,
    Failed,
    Finished,
    QueueFull,
    Request,
    ShuttingDown,
    Started,
)


@dataclass
class ServerState:
    engine: EngineLoop
    tok: Any
    model: str  # the id in the API
    context: int  # positions of the KV cache: prompt + generated tokens must fit
    vocab_size: int
    world_size: int
    metrics: Metrics
    api_key: str | None
    max_body_bytes: int
    max_tokens: int
    health_timeout_s: float
    chat_stop: tuple[str, ...] = ()
    eos_token: str | None = None


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _check_key(state: ServerState, request: HttpRequest) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {state.api_key}".encode()):
        raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer <serve.api_key>",
                       code="invalid_api_key")


async def _json_body(state: ServerState, request: HttpRequest) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise ApiError(413, f"the request body is over serve.max_body_bytes={state.max_body_bytes} bytes")
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > state.max_body_bytes:
            raise ApiError(413, f"the request body is over serve.max_body_bytes={state.max_body_bytes} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None


def _chat_ids(state: ServerState, body: dict[str, Any]) -> list[int]:
    messages = chat_messages(body)
    if not getattr(state.tok, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
    try:
        text = state.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may raise on what it does not accept (e.g. roles out of order)
        raise ApiError(400, f"the chat template refused these messages: {exc}", "messages") from None
    return list(state.tok(text, add_special_tokens=False).input_ids)


def _completion_ids(state: ServerState, body: dict[str, Any]) -> list[int]:
    prompt = completion_prompt(body)
    if isinstance(prompt, str):
        return list(state.tok(prompt).input_ids)  # as tpi_mpi.run tokenizes its prompt
    bad = [i for i in prompt if not 0 <= i < state.vocab_size]
    if bad:
        raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary [0, {state.vocab_size})", "prompt")
    return prompt


def _check_length(state: ServerState, ids: list[int], param: str) -> None:
    if len(ids) >= state.context:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {state.context} "
                            "(the prompt and at least one generated token): shorten it", param,
                       "context_length_exceeded")


async def _watch_disconnect(receive: Receive, req: Request, events: asyncio.Queue[Any]) -> None:
    """The body has been read: the next message is the client's disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    req.cancelled.set()
    events.put_nowait(None)


class _Stream(StreamingResponse):
    """Server-sent events that cancel their request when the client goes away."""

    def __init__(self, content: AsyncIterator[str], req: Request, events: asyncio.Queue[Any]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.req, self.events = req, events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watch = asyncio.ensure_future(_watch_disconnect(receive, self.req, self.events))
        try:
            await super().__call__(scope, receive, send)
        finally:
            watch.cancel()
            self.req.cancelled.set()  # ended by an error on our side: stop the generation too


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(reply: Reply, params: Params, events: asyncio.Queue[Any]) -> AsyncIterator[str]:
    first = True
    while True:
        ev = await events.get()
        if ev is None:  # the client went away
            return
        if isinstance(ev, Started):
            if reply.chat:
                yield _sse(reply.chunk(None, first=True))
                first = False
        elif isinstance(ev, Delta):
            if ev.text:
                yield _sse(reply.chunk(ev.text, first=first))
                first = False
        elif isinstance(ev, Finished):
            yield _sse(reply.chunk(None, ev.finish_reason))
            if params.include_usage:
                yield _sse(reply.usage_chunk(usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)))
            yield "data: [DONE]\n\n"
            return
        elif isinstance(ev, Failed):  # no [DONE]: the client sees an error, never a complete answer
            yield _sse(error_body(ev.message, "server_error"))
            return


async def _whole(reply: Reply, receive: Receive, req: Request, events: asyncio.Queue[Any]) -> Response:
    watch = asyncio.ensure_future(_watch_disconnect(receive, req, events))
    try:
        while True:
            ev = await events.get()
            if ev is None:
                return Response(status_code=499)  # nobody reads it
            if isinstance(ev, Finished):
                use = usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)
                return JSONResponse(reply.whole(ev.text, ev.finish_reason, use))
            elif isinstance(ev, Failed):
                return JSONResponse(error_body(ev.message, "server_error"), status_code=ev.status)
    finally:
        watch.cancel()
        req.cancelled.set()


def _completions(chat: bool) -> Any:
    endpoint = "chat" if chat else "completions"

    async def handler(request: HttpRequest) -> Response:
        state: ServerState = request.app.state.tpi
        try:
            _check_key(state, request)
            body = await _json_body(state, request)
            params = parse_params(body, state.model, state.max_tokens, state.chat_stop if chat else ())
            ids = _chat_ids(state, body) if chat else _completion_ids(state, body)
            _check_length(state, ids, "messages" if chat else "prompt")
        except ApiError as exc:
            state.metrics.finished(endpoint, f"http_{exc.status}")
            return _error(exc)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def emit(ev: Any) -> None:  # on the engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the HTTP loop is gone (shutting down)
                pass

        req = Request(ids, params.max_tokens, emit, params.temperature, params.top_p, params.seed, params.stop,
                      label=endpoint, deltas=params.stream)
        try:
            state.engine.submit(req)
        except QueueFull:
            state.metrics.finished(endpoint, "http_429")
            return _error(ApiError(429, "the server is busy: its queue is full (serve.queue_size), retry later",
                                   code="queue_full"))
        except ShuttingDown:
            return _error(ApiError(503, "the server is shutting down"))
        reply = Reply(chat, state.model)
        if params.stream:
            return _Stream(_stream(reply, params, events), req, events)
        return await _whole(reply, request.receive, req, events)

    return handler


async def models(request: HttpRequest) -> Response:
    state: ServerState = request.app.state.tpi
    try:
        _check_key(state, request)
    except ApiError as exc:
        return _error(exc)
    return JSONResponse({"object": "list", "data": [
        {"id": state.model, "object": "model", "created": 0, "owned_by": "tpi_mpi",
         "context_length": state.context, "world_size": state.world_size}]})


async def _report(state: ServerState) -> list[dict[str, Any]] | None:
    """Every rank's counters, or None if they do not come within serve.health_timeout_s."""
    fut = state.engine.call(lambda master: master.report())
    try:
        return await asyncio.wait_for(asyncio.wrap_future(fut), state.health_timeout_s)
    except (asyncio.TimeoutError, ShuttingDown):
        return None


async def health(request: HttpRequest) -> Response:
    state: ServerState = request.app.state.tpi
    engine = state.engine
    t0 = time.monotonic()
    report = await _report(state)
    if report is None:
        op = engine.session.master.watchdog.current
        where = f"; rank 0 waits in {op.describe()} since {time.monotonic() - op.started:.1f} s" if op else ""
        return JSONResponse({"status": "unavailable", "world_size": state.world_size,
                             "detail": f"the ranks did not answer within serve.health_timeout_s="
                                       f"{state.health_timeout_s:g} s{where}"}, status_code=503)
    return JSONResponse({"status": "ok", "world_size": state.world_size, "answer_s": time.monotonic() - t0,
                         "ranks": [{"rank": r["rank"], "alive": True} for r in report],
                         "generating": engine.generating, "waiting": engine.waiting})


async def metrics(request: HttpRequest) -> Response:
    state: ServerState = request.app.state.tpi
    try:
        _check_key(state, request)
    except ApiError as exc:
        return _error(exc)
    report = await _report(state)
    if report is None:
        return _error(ApiError(503, "the ranks did not answer: see GET /health"))
    text = state.metrics.text(report, state.engine.waiting, state.engine.generating)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _http_error(request: HttpRequest, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)


def make_app(state: ServerState) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/chat/completions", _completions(True), methods=["POST"]),
        Route("/v1/completions", _completions(False), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: _http_error})
    app.state.tpi = state
    return app
