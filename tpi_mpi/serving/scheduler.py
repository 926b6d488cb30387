"""Rank 0's side of serving: requests in a bounded FIFO queue, one generation at a time, the prompt cache.

Everything here that touches MPI runs on one thread (the engine thread, rank 0's main thread); the HTTP
server and the terminal chat hand it `Request`s and get `Event`s back through the request's `emit`, which
is called on the engine thread. Between two tokens the loop looks at the request's `cancelled` flag (a
client gone), answers control calls (health, metrics: `EngineLoop.call`) and the shutdown flag.

Prompt cache: the KV cache on every rank keeps the last sequence (prompt and generated tokens). A request
whose ids begin with those ids prefills only the rest; rank 0 alone compares ids, the workers are only
told where the new positions start (the header's `start`). This is the interface a batching engine
(several sequences at once) would keep: Request in, Events out.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tpi_mpi.generate import Sampler, common_prefix
from tpi_mpi.serving.text import Detokenizer, StopStrings


@dataclass
class Request:
    ids: list[int]  # the whole prompt, token ids
    max_tokens: int
    emit: Callable[[Event], None]  # called on the engine thread, in order: Started, Delta..., Finished|Failed
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling without a seed draws one
    stop: tuple[str, ...] = ()
    label: str = ""  # the caller's name for it (the endpoint, in the metrics)
    deltas: bool = True  # emit a Delta per token (streaming); else the text comes with Finished only
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    generated: int = 0  # tokens so far (set by the engine thread)


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens found in the KV cache, not prefilled
    queued_s: float


@dataclass
class Delta:
    text: str  # final text since the last Delta (may be empty: a token that ends no character yet)
    tokens: int  # tokens generated so far


@dataclass
class Finished:
    finish_reason: str  # stop (end of sequence token or a stop string), length (max_tokens or context full)
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queued_s: float  # arrival to start of the prefill
    ttft_s: float  # arrival to first token, queue included
    token_latencies_s: list[float]


@dataclass
class Failed:
    message: str
    status: int = 503


Event = Started | Delta | Finished | Failed


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """The client went away: the generation stops here, nobody is waiting for its result."""


class ShuttingDown(Exception):
    pass


class Session:
    """One sequence at a time on the master, keeping the KV cache of the last one (the prompt cache)."""

    def __init__(self, master: Any, tok: Any, context: int, eos_ids: set[int], prompt_cache: bool = True):
        self.master, self.tok, self.context, self.eos_ids = master, tok, context, eos_ids
        self.prompt_cache = prompt_cache
        self.cached: list[int] = []  # the ids whose keys and values the KV cache holds, in order

    def generate(self, req: Request, between_tokens: Callable[[], None]) -> Finished:
        """Prefill what the cache lacks, then decode. `between_tokens` may raise Cancelled or ShuttingDown:
        the ranks are in step then, and the sequence is ended as after its last token. Any other exception
        comes from the engine (the ranks may be out of step) and passes through as it is."""
        try:
            result = self._generate(req, between_tokens)
        except (Cancelled, ShuttingDown):
            self.master.end_sequence()
            raise
        self.master.end_sequence()
        return result

    def _generate(self, req: Request, between_tokens: Callable[[], None]) -> Finished:
        ids = req.ids
        start = min(common_prefix(self.cached, ids), len(ids) - 1) if self.prompt_cache else 0
        max_tokens = min(req.max_tokens, self.context - len(ids))
        queued = time.monotonic() - req.arrived
        req.emit(Started(len(ids), start, queued))
        sampler = Sampler(req.temperature > 0, req.temperature or 1.0, 0, req.top_p,
                          req.seed if req.seed is not None else secrets.randbits(63))
        detok, stops = Detokenizer(self.tok), StopStrings(req.stop)
        self.cached = self.cached[:start]  # positions from `start` on are overwritten below
        logits = self.master.forward(ids[start:], start, self.context if start == 0 else 0)
        self.cached = list(ids)
        ttft, latencies, n, reason, stopped = 0.0, [], 0, "length", False
        t_prev = time.monotonic()
        while n < max_tokens:
            token = sampler(logits)
            now = time.monotonic()
            if n == 0:
                ttft = now - req.arrived
            else:
                latencies.append(now - t_prev)
            t_prev, n = now, n + 1
            req.generated = n
            if token in self.eos_ids:
                reason = "stop"
                break
            text, stopped = stops.add(detok.add(token))
            if req.deltas:
                req.emit(Delta(text, n))
            if stopped or n == max_tokens:
                break
            between_tokens()
            if req.cancelled.is_set():
                raise Cancelled
            logits = self.master.forward([token], len(self.cached))
            self.cached.append(token)
        if not stopped:  # what was held back is final now (a stop string may still be in it)
            text, stopped = stops.add(detok.flush())
            text += "" if stopped else stops.flush()
            if text and req.deltas:
                req.emit(Delta(text, n))
        reason = "stop" if stopped else reason
        return Finished(reason, stops.text, len(ids), n, start, queued, ttft, latencies)


class EngineLoop:
    """The engine thread's loop: requests from a bounded FIFO queue, control calls ahead of them."""

    def __init__(self, session: Session, queue_size: int, heartbeat_s: float = 0.0,
                 on_finished: Callable[[Request, Finished | None, str], None] | None = None):
        self.session, self.queue_size, self.heartbeat_s = session, queue_size, heartbeat_s
        self.on_finished = on_finished  # metrics: (request, its Finished or None, outcome)
        self._cv = threading.Condition()
        self._requests: deque[Request] = deque()
        self._calls: deque[tuple[Callable[[Any], Any], Future[Any]]] = deque()
        self._closing = False
        self.running: Request | None = None
        self.last_pass = time.monotonic()  # when the ranks last finished something together

    # ---- from any thread -------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._cv:
            if self._closing:
                raise ShuttingDown
            if self._waiting() >= self.queue_size and (self.running is not None or self._requests):
                raise QueueFull
            self._requests.append(req)
            self._cv.notify()

    def call(self, fn: Callable[[Any], Any]) -> Future[Any]:
        """Run fn(master) on the engine thread, between tokens if a generation runs."""
        fut: Future[Any] = Future()
        with self._cv:
            if self._closing:
                fut.set_exception(ShuttingDown())
                return fut
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def close(self) -> None:
        """Stop after the current token: the running and the waiting requests fail, then run() returns."""
        with self._cv:
            self._closing = True
            self._cv.notify()

    def fail_all(self, message: str) -> None:
        """From any thread, when the job is going down: the running and the waiting requests get an error."""
        with self._cv:
            self._closing = True
            reqs = ([self.running] if self.running is not None else []) + list(self._requests)
        for req in reqs:
            req.emit(Failed(message, 500))

    def _waiting(self) -> int:
        """Requests waiting whose clients are still there (the others are dropped when their turn comes)."""
        return sum(not r.cancelled.is_set() for r in self._requests)

    @property
    def waiting(self) -> int:
        with self._cv:
            return self._waiting()

    @property
    def generating(self) -> int:
        """Requests generating now (one at most here; serving.batch_loop.BatchLoop: up to serve.max_batch)."""
        return int(self.running is not None)

    # ---- the engine thread -----------------------------------------------------------------------------
    def _run_calls(self) -> None:
        while True:
            with self._cv:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            if fut.set_running_or_notify_cancel():
                fut.set_result(fn(self.session.master))  # an error here is the engine's: it ends the job
            self.last_pass = time.monotonic()

    def _between_tokens(self) -> None:
        self.last_pass = time.monotonic()
        self._run_calls()
        if self._closing:
            raise ShuttingDown

    def run(self) -> None:
        """Until close(). An exception from the engine ends the job (the ranks' collectives are out of step):
        the running and the waiting requests are told first."""
        try:
            self._loop()
        except BaseException:
            self._fail_waiting("the engine failed: the job is ending", 500)
            raise
        self._fail_waiting("the server is shutting down")

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not (self._requests or self._calls or self._closing):
                    self._cv.wait(self.heartbeat_s or None)
                if self._closing:
                    break
                req = self._requests.popleft() if self._requests and not self._calls else None
                if req is None and not self._calls:  # a quiet heartbeat: every rank still there?
                    self._calls.append((lambda m: m.report(), Future()))
                self.running = req
            self._run_calls()
            if req is None:
                continue
            if req.cancelled.is_set():  # its client left while it waited
                self._finish(req, None, "cancelled")
                continue
            self._serve(req)

    def _serve(self, req: Request) -> None:
        try:
            result = self.session.generate(req, self._between_tokens)
        except Cancelled:
            self._finish(req, None, "cancelled")
        except ShuttingDown:
            req.emit(Failed("the server is shutting down: the generation was stopped"))
            self._finish(req, None, "failed")
        except BaseException as exc:  # the ranks may be out of step: no more collectives, the job ends
            req.emit(Failed(f"the engine failed ({type(exc).__name__}): the job is ending", 500))
            self._finish(req, None, "failed")
            raise
        else:
            req.emit(result)
            self._finish(req, result, "ok")
        self.last_pass = time.monotonic()

    def _finish(self, req: Request, result: Finished | None, outcome: str) -> None:
        with self._cv:
            self.running = None
        if self.on_finished is not None:
            self.on_finished(req, result, outcome)

    def _fail_waiting(self, message: str, status: int = 503) -> None:
        with self._cv:
            waiting, self._requests = list(self._requests), deque()
            calls, self._calls = list(self._calls), deque()
        for req in waiting:
            req.emit(Failed(message, status))
            self._finish(req, None, "failed")
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(ShuttingDown())
