"""The OpenAI-compatible server for real: `mpirun -n 2 python -m tpi_mpi.serve` and the official `openai` client.

One server (module fixture, with an API key) answers the happy-path tests, the bad input table and the
queue tests; the fault test starts its own and kills a worker. Every server is stopped (SIGTERM, then
SIGKILL of the whole tree) in a finally; it listens on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from serve_util import CONTEXT, MODEL_NAME, NO_EOS, Server, chat_model, run_record

N = 2
KEY = "test-key-123"
QUEUE = 8
MAX_TOKENS = 200  # below the trained model's context of 256 positions, so that a request may get all of them
MODEL = MODEL_NAME  # serve.model_name unset: the checkpoint's folder name (test_serve_batch.py sets one)
PROMPTS = ["Now is the winter of our discontent", "KING HENRY. What news", "To be, or not to be", "O",
           "HAMLET. Where is", "My lord, I", "Good morrow to you all, my friends and", "ROMEO. But soft"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return chat_model(tmp_path_factory.mktemp("serve"), N)


@pytest.fixture(scope="module")
def server(model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(N, model, tmp_path_factory.mktemp("server"), [
        f"serve.queue_size={QUEUE}", f"serve.max_tokens={MAX_TOKENS}", "serve.max_body_bytes=20000",
        NO_EOS], env={"TPI_MPI_API_KEY": KEY})
    try:
        yield srv
        assert srv.stop() == 0, srv.stderr()
        assert "tpi_mpi: error" not in srv.stderr()
    finally:
        srv.kill()


def client(server: Server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.base}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def chat_ids(model: dict[str, Path], messages: list[dict[str, str]]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model["model"])
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False).input_ids)


def evict(c: openai.OpenAI) -> None:
    """A request that shares no token with anything else: the next one starts from an empty cache."""
    c.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=1)


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in client(server).models.list()] == [MODEL]
    h = httpx.get(f"{server.base}/health", timeout=60).json()
    assert h["status"] == "ok" and [r["rank"] for r in h["ranks"]] == [0, 1]


def test_completion_streamed_and_not_equal_run(server: Server, model: dict[str, Path], tmp_path: Path) -> None:
    c = client(server)
    evict(c)
    whole = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    parts = list(c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True,
                                      stream_options={"include_usage": True}))
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == whole.choices[0].finish_reason
    ref = run_record(model, tmp_path, N, [f"prompt='{PROMPTS[0]}'"], 12)
    assert whole.choices[0].text == text == ref["text"]
    assert whole.usage.prompt_tokens == ref["prompt_tokens"]
    assert whole.usage.completion_tokens == ref["generated_tokens"]
    assert whole.choices[0].finish_reason == ("length" if ref["generated_tokens"] == 12 else "stop")


def test_chat_streamed_and_not_equal_run(server: Server, model: dict[str, Path], tmp_path: Path) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "Good morrow, who art thou?"}]
    evict(c)
    whole = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)  # type: ignore[arg-type]
    evict(c)
    parts = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True))  # type: ignore[arg-type]
    assert parts[0].choices[0].delta.role == "assistant"
    text = "".join(p.choices[0].delta.content or "" for p in parts)
    ids = chat_ids(model, messages)
    ref = run_record(model, tmp_path, N, [f"prompt_ids=[{','.join(map(str, ids))}]"], 10)
    assert whole.choices[0].message.content == text == ref["text"]
    assert whole.usage is not None and whole.usage.prompt_tokens == len(ids)
    assert whole.usage.prompt_tokens_details is not None and whole.usage.prompt_tokens_details.cached_tokens == 0


def test_second_turn_is_cached_and_same_as_cold(server: Server) -> None:
    c = client(server)
    turn1 = [{"role": "user", "content": "What news from the court?"}]
    evict(c)
    a1 = c.chat.completions.create(model=MODEL, messages=turn1, max_tokens=8)  # type: ignore[arg-type]
    assert a1.usage is not None
    turn2 = [*turn1, {"role": "assistant", "content": a1.choices[0].message.content or ""},
             {"role": "user", "content": "And then?"}]
    warm = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8)  # type: ignore[arg-type]
    evict(c)
    cold = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8)  # type: ignore[arg-type]
    assert warm.usage is not None and cold.usage is not None
    assert warm.usage.prompt_tokens_details is not None and cold.usage.prompt_tokens_details is not None
    # At least the whole first prompt was found in the cache (the reply is tokenized again by the template).
    assert warm.usage.prompt_tokens_details.cached_tokens >= a1.usage.prompt_tokens
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert warm.usage.completion_tokens == cold.usage.completion_tokens


def test_eight_concurrent_clients_each_as_alone(server: Server) -> None:
    c = client(server)
    alone = {}
    for p in PROMPTS:
        evict(c)
        alone[p] = c.completions.create(model=MODEL, prompt=p, max_tokens=16).choices[0].text
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(i: int, p: str) -> None:
        try:
            if i % 2:  # half of them streamed
                stream = client(server).completions.create(model=MODEL, prompt=p, max_tokens=16, stream=True)
                results[p] = "".join(x.choices[0].text for x in stream)
            else:
                results[p] = client(server).completions.create(model=MODEL, prompt=p, max_tokens=16).choices[0].text
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == len(PROMPTS)
    assert results == alone


def _long_stream(c: openai.OpenAI) -> Any:
    stream = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, stream=True)
    return stream, iter(stream)


def test_disconnect_stops_generation_and_next_starts(server: Server) -> None:
    c = client(server)
    before = metric(server, "tpi_serve_requests_total", '{endpoint="completions",outcome="cancelled"}')
    stream, chunks = _long_stream(c)
    for _ in range(3):
        next(chunks)
    stream.close()  # the client goes away after 3 tokens of MAX_TOKENS
    t0 = time.monotonic()
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")
    after = metric(server, "tpi_serve_requests_total", '{endpoint="completions",outcome="cancelled"}')
    assert after == before + 1
    # It stopped within a few tokens of the disconnect, not after its MAX_TOKENS.
    assert metric(server, "tpi_serve_cancelled_tokens_total") < MAX_TOKENS / 4, time.monotonic() - t0


def test_full_queue_is_429_and_serving_goes_on(server: Server) -> None:
    c = client(server)
    running, chunks = _long_stream(c)
    next(chunks)  # generating now
    waiting = [_long_stream(c)[0] for _ in range(QUEUE)]  # answered 200 with headers: in the queue
    try:
        with pytest.raises(openai.RateLimitError) as exc:
            c.completions.create(model=MODEL, prompt="Hello", max_tokens=2)
        assert exc.value.status_code == 429 and "queue is full" in str(exc.value)
        assert metric(server, "tpi_serve_queue_waiting") == QUEUE
    finally:
        for s in [running, *waiting]:
            s.close()
    deadline = time.monotonic() + 60  # until the server has seen the clients go (their connections closed)
    while metric(server, "tpi_serve_queue_waiting") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens >= 1


def test_missing_or_wrong_key_is_401(server: Server) -> None:
    for key in ("wrong", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as exc:
            client(server, key).completions.create(model=MODEL, prompt="Hello", max_tokens=1)
        assert exc.value.status_code == 401
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):  # none, not a bearer
        r = httpx.post(f"{server.url}/completions", json={"model": MODEL, "prompt": "x"}, headers=headers,
                       timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/chat/completions", json={"model": MODEL, "messages": []}, timeout=60)
    assert r.status_code == 401  # the key is checked before anything else
    assert httpx.get(f"{server.base}/metrics", timeout=60).status_code == 401


LONG = "word " * 1000  # more tokens than the model's 256 positions
# (endpoint, body, status, what the error message must say); a raw body is sent as it is.
BAD_INPUT: list[tuple[str, Any, int, str]] = [
    ("completions", b"{not json", 400, "not valid JSON"),
    ("completions", b"[1, 2]", 400, "must be a JSON object"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 400, "the model 'gpt-4' does not exist"),
    ("completions", {"prompt": "x"}, 400, "model is required"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n=2"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n=3"),
    ("completions", {"model": MODEL, "prompt": LONG}, 400, f"context holds {CONTEXT}"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "context holds"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature must be a number in [0, 2]"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": 2.5}, 400, "temperature must be"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": "hot"}, 400, "temperature must be"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p must be a number in (0, 1]"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p must be"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, f"max_tokens must be in [1, {MAX_TOKENS}]"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_TOKENS + 1}, 400,
     f"max_tokens must be in [1, {MAX_TOKENS}]"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 1.5}, 400, "max_tokens must be an integer"),
    ("completions", {"model": MODEL, "prompt": "x", "seed": "abc"}, 400, "seed must be an integer"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be"),
    ("completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop must be"),
    ("completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream must be true or false"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs=2 is not supported"),
    ("completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo=True is not supported"),
    ("completions", {"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, 400, "no penalties"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("completions", {"model": MODEL, "prompt": 5}, 400, "prompt must be a string"),
    ("completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "token id 99999 is outside the vocabulary"),
    ("chat/completions", {"model": MODEL, "messages": []}, 400, "messages must be a non-empty list"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "role system"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content must be"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text parts"),
    ("completions", {"model": MODEL, "prompt": "x" * 30000}, 413, "serve.max_body_bytes=20000"),
    ("nothing", {"model": MODEL}, 404, "Not Found"),
]


@pytest.mark.parametrize("endpoint,body,status,message", BAD_INPUT,
                         ids=[f"{e}-{i}" for i, (e, *_) in enumerate(BAD_INPUT)])
def test_bad_input_is_an_openai_error(server: Server, endpoint: str, body: Any, status: int, message: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/{endpoint}", content=data, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and {"message", "type", "param", "code"} <= set(err)
    # ... and the server goes on serving
    assert client(server).completions.create(model=MODEL, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_stop_strings(server: Server) -> None:
    c = client(server)
    full = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20).choices[0].text
    assert len(full) >= 6, full
    stop = full[3:5]  # a stop string in the middle of the text
    cut = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=20, stop=stop, stream=True)
    assert "".join(x.choices[0].text for x in streamed) == cut.choices[0].text


def processes(srv: Server) -> tuple[list[psutil.Process], psutil.Process]:
    """Every process of the job (mpirun, its proxy, the ranks, the sentinel), and rank 1."""
    procs = [psutil.Process(srv.proc.pid), *psutil.Process(srv.proc.pid).children(recursive=True)]
    rank1 = next(p for p in procs if p.environ().get("PMI_RANK") == "1" and "tpi_mpi.serve" in " ".join(p.cmdline()))
    return procs, rank1


def assert_all_gone(procs: list[psutil.Process]) -> None:
    """mpirun, its proxy, the ranks and the sentinel (which exits on its own once the ranks are gone)."""
    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive


def test_worker_killed_while_streaming(model: dict[str, Path], tmp_path: Path) -> None:
    srv = Server(N, model, tmp_path, [f"serve.max_tokens={MAX_TOKENS}", NO_EOS])
    try:
        procs, worker = processes(srv)
        c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
        stream = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, stream=True)
        chunks = iter(stream)
        first = [next(chunks).choices[0].finish_reason for _ in range(3)]
        assert first == [None, None, None]
        worker.send_signal(signal.SIGKILL)
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for chunk in chunks:  # no finish_reason, no [DONE]: an error
                assert chunk.choices[0].finish_reason is None
        t0 = time.monotonic()
        code = srv.wait(60)
        assert code != 0 and time.monotonic() - t0 < 30
        errors = [line for line in srv.stderr().splitlines() if line.startswith("tpi_mpi: error:")]
        assert len(errors) == 1 and "rank 1" in errors[0], srv.stderr()
        assert "Traceback" not in srv.stderr()
        assert_all_gone(procs)
    finally:
        srv.kill()


def test_worker_stalled_health_says_so_and_job_ends(model: dict[str, Path], tmp_path: Path) -> None:
    srv = Server(N, model, tmp_path, [f"serve.max_tokens={MAX_TOKENS}", NO_EOS, "comm.timeout_s=6",
                                      "serve.health_timeout_s=1"])
    try:
        procs, worker = processes(srv)
        c = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=60)
        chunks = iter(c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, stream=True))
        next(chunks)
        worker.send_signal(signal.SIGSTOP)
        h = httpx.get(f"{srv.base}/health", timeout=30)
        assert h.status_code == 503 and h.json()["status"] == "unavailable", h.text
        assert "did not answer" in h.json()["detail"]
        with pytest.raises(openai.APIError) as exc:  # the error event the server sends before the job ends
            for chunk in chunks:
                assert chunk.choices[0].finish_reason is None
        assert "the job is ending" in str(exc.value) and "watchdog" in str(exc.value)
        assert srv.wait(60) != 0
        errors = [line for line in srv.stderr().splitlines() if line.startswith("tpi_mpi: error:")]
        assert len(errors) == 1 and "watchdog" in errors[0] and "rank 1" in errors[0], srv.stderr()
        assert_all_gone(procs)
    finally:
        for p in psutil.Process().children(recursive=True):
            if p.status() == psutil.STATUS_STOPPED:
                p.resume()
        srv.kill()
