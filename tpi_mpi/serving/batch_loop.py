"""The engine thread's loop with continuous batching (serve.max_batch > 1): up to max_batch requests generate
together, one forward pass per step (tpi_mpi/batching.py).

The queue, the control calls (health, metrics) and the shutdown are scheduler.EngineLoop's; what changes is
what runs between them: instead of one request to its end, one step of every request in the batch. A request
joins at the next step boundary while the batch has room (else it waits in the queue, which serve.queue_size
bounds); one that finishes, hits a stop string, or whose client leaves frees its slot at the next step. Each
slot keeps the KV cache of the last sequence it held: a request extending that conversation prefills only the
rest (the prompt cache, per slot).
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpi_mpi.batching import Batcher, BatchStats, Sequence
from tpi_mpi.errors import UserError
from tpi_mpi.generate import Sampler
from tpi_mpi.serving.scheduler import Delta, EngineLoop, Failed, Finished, Request, Session, Started
from tpi_mpi.serving.text import Detokenizer, StopStrings

KEPT_LATENCIES = 100_000  # latencies kept for the record's percentiles (a long-running server keeps the latest)


@dataclass
class _Active:
    req: Request
    detok: Detokenizer
    stops: StopStrings
    started: bool = False


class BatchLoop(EngineLoop):
    """scheduler.EngineLoop's interface (submit, call, close, fail_all, run), several requests at a time."""

    def __init__(self, session: Session, max_batch: int, prefill_chunk: int, queue_size: int,
                 heartbeat_s: float = 0.0,
                 on_finished: Callable[[Request, Finished | None, str], None] | None = None,
                 on_pass: Callable[[BatchStats], None] | None = None):
        """`on_pass(stats)`: after every forward pass, the batcher's counters (metrics)."""
        super().__init__(session, queue_size, heartbeat_s, on_finished)
        self.max_batch = max_batch
        self.batcher = Batcher(session.master, session.context, prefill_chunk, session.prompt_cache)
        self.on_pass = on_pass
        self.active: dict[Sequence, _Active] = {}
        # For the record at the end: each finished sequence's TTFT and token latencies (the latest ones).
        self.ttfts: deque[float] = deque(maxlen=KEPT_LATENCIES)
        self.latencies: deque[float] = deque(maxlen=KEPT_LATENCIES)
        self.started_at = time.monotonic()

    @property
    def generating(self) -> int:
        return len(self.active)

    def fail_all(self, message: str) -> None:
        with self._cv:
            self._closing = True
            reqs = [a.req for a in self.active.values()] + list(self._requests)
        for req in reqs:
            req.emit(Failed(message, 500))

    def _finish(self, req: Request, result: Finished | None, outcome: str) -> None:
        with self._cv:
            self.running = next((a.req for a in self.active.values()), None)
        if self.on_finished is not None:
            self.on_finished(req, result, outcome)

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not (self._requests or self._calls or self._closing or self.active):
                    self._cv.wait(self.heartbeat_s or None)
                if self._closing:
                    break
                if not (self._requests or self._calls or self.active):  # a quiet heartbeat: every rank there?
                    self._calls.append((lambda m: m.report(), Future()))
                joining: list[Request] = []
                while self._requests and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self._requests.popleft())
            self._run_calls()
            for req in joining:
                self._join(req)
            if self.active:
                self._step()

    def _join(self, req: Request) -> None:
        if req.cancelled.is_set():  # its client left while it waited
            self._finish(req, None, "cancelled")
            return
        s = self.session
        sampler = Sampler(req.temperature > 0, req.temperature or 1.0, 0, req.top_p,
                          req.seed if req.seed is not None else secrets.randbits(63))
        seq = Sequence(list(req.ids), req.max_tokens, sampler, frozenset(s.eos_ids), arrived=req.arrived)
        try:
            self.batcher.submit(seq)
        except UserError as exc:  # refused before any rank saw it: the others go on
            req.emit(Failed(str(exc), 400))
            self._finish(req, None, "failed")
            return
        self.active[seq] = _Active(req, Detokenizer(s.tok), StopStrings(req.stop))
        with self._cv:
            self.running = self.running or req

    def _step(self) -> None:
        for seq, a in list(self.active.items()):
            if a.req.cancelled.is_set():  # its slot is freed at the start of the pass below
                self.batcher.cancel(seq)
                self.active.pop(seq)
                self._finish(a.req, None, "cancelled")
        if not self.active:
            self.session.master.end_sequence()
            return
        try:
            touched = self.batcher.step()
        except BaseException as exc:  # the ranks may be out of step: no more collectives, the job ends
            for a in self.active.values():
                a.req.emit(Failed(f"the engine failed ({type(exc).__name__}): the job is ending", 500))
                self._finish(a.req, None, "failed")
            self.active.clear()
            raise
        self.last_pass = time.monotonic()
        for seq, a in self.active.items():
            if seq.admitted is not None and not a.started:
                a.started = True
                a.req.emit(Started(len(seq.ids), seq.cached, seq.admitted - a.req.arrived))
        for seq in touched:
            self._token(seq, self.active[seq])
        if self.on_pass is not None:
            self.on_pass(self.batcher.stats)
        if not self.batcher.busy:
            self.session.master.end_sequence()  # the workers wait for the next request sleeping

    def _token(self, seq: Sequence, a: _Active) -> None:
        a.req.generated = n = len(seq.tokens)
        if seq.finish_reason == "stop":  # the end-of-sequence token: not part of the text
            self._done(seq, a, "stop", False)
            return
        text, stopped = a.stops.add(a.detok.add(seq.tokens[-1]))
        if a.req.deltas:
            a.req.emit(Delta(text, n))
        if stopped:
            self.batcher.cancel(seq)  # leaves at the next step; what it produced stands
            self._done(seq, a, "stop", True)
        elif seq.done:
            self._done(seq, a, "length", False)

    def _done(self, seq: Sequence, a: _Active, reason: str, stopped: bool) -> None:
        if not stopped:  # what was held back is final now (a stop string may still be in it)
            text, stopped = a.stops.add(a.detok.flush())
            text += "" if stopped else a.stops.flush()
            if text and a.req.deltas:
                a.req.emit(Delta(text, len(seq.tokens)))
            reason = "stop" if stopped else reason
        assert seq.admitted is not None and seq.ttft_s is not None
        result = Finished(reason, a.stops.text, len(seq.ids), len(seq.tokens), seq.cached,
                          seq.admitted - a.req.arrived, seq.ttft_s, seq.token_latencies_s)
        self.active.pop(seq)
        self.ttfts.append(result.ttft_s)
        self.latencies.extend(result.token_latencies_s)
        a.req.emit(result)
        self._finish(a.req, result, "ok")

    def record(self) -> dict[str, Any]:
        """The server's run record: the batch (occupancy of its passes), aggregate tokens/s and per-sequence
        token latency and TTFT (percentiles over the finished sequences)."""
        st = self.batcher.stats

        def pct(xs: deque[float]) -> dict[str, float | None]:
            return {f"p{q}": float(np.percentile(list(xs), q)) if xs else None for q in (50, 90, 99)}

        return {"kind": "serve", "max_batch": self.max_batch, "prefill_chunk": self.batcher.prefill_chunk,
                "batch": st.to_json(), "slot_uses": self.batcher.slot_uses,
                "tokens_per_s": st.decode_tokens / st.pass_s if st.pass_s else None,
                "token_latency_s": pct(self.latencies), "ttft_s": pct(self.ttfts),
                "uptime_s": time.monotonic() - self.started_at}

    def summary(self) -> str:
        r = self.record()
        lat, occ = r["token_latency_s"]["p50"], r["batch"]["mean_occupancy"]
        return (f"{r['batch']['decode_tokens']} tokens in {r['batch']['passes']} passes | batch occupancy mean "
                + (f"{occ:.2f}" if occ else "-") + f" of {self.max_batch} | "
                + (f"{r['tokens_per_s']:.1f} tok/s aggregate | " if r["tokens_per_s"] else "")
                + (f"token latency p50 {lat * 1e3:.1f} ms per sequence" if lat else "no token latencies"))
