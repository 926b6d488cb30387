"""The serving parts that need no MPI: incremental text, stop strings, request checks, and the scheduler
(prompt cache, queue, cancellation) on a fake master that records what it is asked."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from tpi_mpi.make_model import make_model
from tpi_mpi.serving.protocol import ApiError, parse_params
from tpi_mpi.serving.scheduler import (
    Cancelled,
    Delta,
    EngineLoop,
    Failed,
    Finished,
    QueueFull,
    Request,
    Session,
    Started,
)
from tpi_mpi.serving.text import Detokenizer, StopStrings


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_model(tmp_path_factory.mktemp("tok") / "m", "tiny", "llama", layers=1))


def test_detokenizer_gives_the_whole_text_piece_by_piece(tok: Any) -> None:
    text = "Good morrow, café – naïve ☃ friends!"
    ids = tok(text, add_special_tokens=False).input_ids
    d = Detokenizer(tok)
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # a character split over tokens comes out whole


def test_detokenizer_flushes_an_unfinished_character_as_run_does(tok: Any) -> None:
    ids = tok("☃", add_special_tokens=False).input_ids
    assert len(ids) > 1  # bytes of one character
    d = Detokenizer(tok)
    assert "".join(d.add(i) for i in ids[:-1]) == ""
    assert d.flush() == tok.decode(ids[:-1])  # U+FFFD, as tpi_mpi.run prints it


@pytest.mark.parametrize("pieces, stops, out, stopped", [
    (["Hello", " wor", "ld"], ("wor",), "Hello ", True),
    (["ab", "c", "de"], ("cd",), "ab", True),  # split over pieces: "c" held back
    (["ab", "c", "x"], ("cd",), "abcx", False),  # held back, then not a stop after all
    (["xx", "END"], ("E", "END"), "xx", True),  # the first to start wins
    (["a\n", "\nb"], ("\n\n",), "a", True),
    (["plain"], (), "plain", False),
])
def test_stop_strings(pieces: list[str], stops: tuple[str, ...], out: str, stopped: bool) -> None:
    s = StopStrings(stops)
    got, hit = "", False
    for p in pieces:
        text, hit = s.add(p)
        got += text
        if hit:
            break
    if not hit:
        got += s.flush()
    assert (got, hit) == (out, stopped)


def test_params() -> None:
    p = parse_params({"model": "m", "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": "x", "stream": True,
                      "stream_options": {"include_usage": True}, "max_completion_tokens": 5}, "m", 10, ("\n\n",))
    assert (p.temperature, p.top_p, p.seed, p.stop, p.stream, p.include_usage, p.max_tokens) == \
        (0.7, 0.9, 3, ("x", "\n\n"), True, True, 5)
    default = parse_params({"model": "m"}, "m", 10)
    assert default.max_tokens == 10 and default.temperature == 0
    with pytest.raises(ApiError, match="n=2"):
        parse_params({"model": "m", "n": 2}, "m", 10)
    with pytest.raises(ApiError, match="max_tokens must be an integer"):
        parse_params({"model": "m", "max_tokens": True}, "m", 10)


class FakeMaster:
    """Records forward(ids, start, capacity); its logits make the next token (last id + 1) % vocab."""

    def __init__(self, vocab: int = 50):
        self.vocab, self.calls, self.idle, self.reports = vocab, [], True, 0
        self.gate: threading.Event | None = None  # set: forward waits for it (a long generation)
        self.three_reports = threading.Event()

    def forward(self, ids: list[int], start: int, capacity: int = 0) -> torch.Tensor:
        self.calls.append((list(ids), start, capacity))
        self.idle = False
        if self.gate is not None:
            self.gate.wait(10)
        logits = torch.zeros(self.vocab)
        logits[(ids[-1] + 1) % self.vocab] = 1.0
        return logits

    def end_sequence(self) -> None:
        self.idle = True

    def report(self) -> list[dict[str, Any]]:
        self.reports += 1
        if self.reports == 3:
            self.three_reports.set()
        return [{"rank": 0}]


class ByteTok:
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def collect() -> tuple[list[Any], Any]:
    events: list[Any] = []
    return events, events.append


def test_prompt_cache_prefills_only_what_is_new() -> None:
    m = FakeMaster()
    s = Session(m, ByteTok(), context=100, eos_ids={49})
    ev, emit = collect()
    r1 = s.generate(Request([1, 2, 3], 4, emit), lambda: None)
    assert r1.text == "efgh" and r1.cached_tokens == 0 and r1.completion_tokens == 4
    assert m.calls[0] == ([1, 2, 3], 0, 100) and [c[1] for c in m.calls] == [0, 3, 4, 5]
    assert s.cached == [1, 2, 3, 4, 5, 6]  # the last token (7) was never fed
    m.calls.clear()
    r2 = s.generate(Request([1, 2, 3, 4, 5, 6, 7, 20], 2, emit), lambda: None)  # the next turn
    assert r2.cached_tokens == 6 and m.calls[0] == ([7, 20], 6, 0)
    m.calls.clear()
    r3 = s.generate(Request([1, 2, 9], 1, emit), lambda: None)  # diverges after 2
    assert r3.cached_tokens == 2 and m.calls[0] == ([9], 2, 0)
    m.calls.clear()
    s.generate(Request([1, 2, 9], 1, emit), lambda: None)  # the same prompt again: its last token is fed
    assert m.calls[0] == ([9], 2, 0)
    m.calls.clear()
    s.prompt_cache = False
    assert s.generate(Request([1, 2, 9], 1, emit), lambda: None).cached_tokens == 0 and m.calls[0][1:] == (0, 100)
    assert isinstance(ev[0], Started) and all(isinstance(e, Started | Delta) for e in ev) and m.idle


def test_eos_stop_string_and_context_end_a_generation() -> None:
    m = FakeMaster()
    s = Session(m, ByteTok(), context=10, eos_ids={5})
    _, emit = collect()
    r = s.generate(Request([1, 2], 50, emit), lambda: None)
    assert (r.finish_reason, r.completion_tokens, r.text) == ("stop", 3, "de")  # 3, 4, then EOS 5
    r = s.generate(Request([10, 11], 50, emit, stop=("n",)), lambda: None)  # m n ...
    assert (r.finish_reason, r.text) == ("stop", "m")
    r = s.generate(Request([20, 21], 50, emit), lambda: None)
    assert (r.finish_reason, r.completion_tokens) == ("length", 8)  # the context holds 10 positions


def test_cancel_between_tokens_ends_the_sequence() -> None:
    m = FakeMaster()
    s = Session(m, ByteTok(), context=100, eos_ids=set())
    _, emit = collect()
    req = Request([1], 50, emit)

    def between() -> None:
        if req.generated == 3:
            req.cancelled.set()

    with pytest.raises(Cancelled):
        s.generate(req, between)
    assert req.generated == 3 and m.idle and s.cached == [1, 2, 3]


def test_engine_loop_queue_full_cancelled_waiting_and_shutdown() -> None:
    m = FakeMaster()
    m.gate = threading.Event()
    finished: list[tuple[str, str]] = []
    loop = EngineLoop(Session(m, ByteTok(), 100, set()), queue_size=1,
                      on_finished=lambda req, res, outcome: finished.append((req.label, outcome)))
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        ev_a, emit_a = collect()
        started, a_done, c_done = threading.Event(), threading.Event(), threading.Event()

        def on_a(e: Any) -> None:
            emit_a(e)
            (a_done if isinstance(e, Finished) else started).set()

        a = Request([1], 3, on_a, label="a")
        loop.submit(a)
        assert started.wait(10)  # a is running
        b = Request([2], 3, lambda e: None, label="b")
        loop.submit(b)
        with pytest.raises(QueueFull):
            loop.submit(Request([3], 3, lambda e: None))
        b.cancelled.set()  # b's client left: its slot is free at once
        ev_c, emit_c = collect()
        c = Request([4], 2, lambda e: (emit_c(e), isinstance(e, Finished) and c_done.set()), label="c")
        loop.submit(c)
        assert loop.waiting == 1
        m.gate.set()
        fut = loop.call(lambda master: master.report())
        assert fut.result(10) == [{"rank": 0}]
        assert a_done.wait(10) and c_done.wait(10)  # b was skipped: its client had left
        ev_d, emit_d = collect()
        d = Request([5], 50, emit_d)  # running when the loop is closed
        m.gate.clear()
        loop.submit(d)
    finally:
        m.gate.set()
        loop.close()
        thread.join(10)
    assert not thread.is_alive()
    assert isinstance(ev_a[-1], Finished) and ev_a[-1].text == "cde"
    assert isinstance(ev_c[-1], Finished) and ev_c[-1].text == "fg"
    assert finished[:3] == [("a", "ok"), ("b", "cancelled"), ("c", "ok")]
    assert isinstance(ev_d[-1], Failed) and "shutting down" in ev_d[-1].message


def test_engine_loop_idle_heartbeat_asks_the_ranks() -> None:
    m = FakeMaster()
    loop = EngineLoop(Session(m, ByteTok(), 100, set()), queue_size=1, heartbeat_s=0.01)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        assert m.three_reports.wait(10)  # nobody asked: the loop did, every heartbeat_s
    finally:
        loop.close()
        thread.join(10)
    assert not thread.is_alive()


def test_api_key_is_not_sent_to_workers_nor_written_to_records() -> None:
    from tpi_mpi.config import build_config

    cfg = build_config({"model": {"path": "x"}, "prompt": "p", "serve": {"api_key": "secret"}})
    assert cfg.serve.api_key == "secret"
    assert cfg.public().serve.api_key is None  # what rank 0 sends the workers
    assert cfg.to_json()["serve"]["api_key"] == "<set>" and "secret" not in str(cfg.to_json())
