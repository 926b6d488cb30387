"""The server with continuous batching (serve.max_batch=3, serving/batch_loop.py), for real: `mpirun -n 2
python -m tpi_mpi.serve` and the `openai` client. Concurrent requests get what they get alone, a full batch
queues the rest, a client leaving mid-batch changes nobody else's text and frees its slot, each slot keeps
its own prompt cache, and /metrics shows the batch. (Numerics: tests/test_batching.py.)
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from serve_util import MODEL_NAME, NO_EOS, Server, chat_model, run_record

N = 2
SLOTS = 3
MODEL = f"{MODEL_NAME}-5m"  # set by serve.model_name (test_serve.py checks the default name)
PROMPTS = ["Now is the winter of our discontent", "KING HENRY. What news", "To be, or not to be", "O",
           "HAMLET. Where is", "My lord, I", "Good morrow to you all, my friends and"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return chat_model(tmp_path_factory.mktemp("serve_batch"), N)


@pytest.fixture(scope="module")
def server(model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Chunks of 4 prompt tokens: the longer prompts are prefilled over several passes, between decode steps.
    tmp = tmp_path_factory.mktemp("server")
    srv = Server(N, model, tmp, [
        f"serve.max_batch={SLOTS}", "serve.prefill_chunk=4", "serve.queue_size=16", "serve.max_tokens=200",
        f"serve.model_name={MODEL}", NO_EOS, f"output.json={tmp}/record.json"])
    try:
        yield srv
        assert srv.stop() == 0, srv.stderr()
        assert "tpi_mpi: error" not in srv.stderr()
        # The run record at the end: how full the passes were, aggregate tokens/s, per-sequence latencies.
        rec = json.loads((tmp / "record.json").read_text())
        assert rec["max_batch"] == SLOTS and 1 < rec["batch"]["mean_occupancy"] <= SLOTS
        assert max(int(k) for k in rec["batch"]["occupancy"]) == SLOTS
        assert rec["tokens_per_s"] > 0 and 0 < rec["token_latency_s"]["p50"] <= rec["token_latency_s"]["p99"]
        assert rec["ttft_s"]["p50"] > 0
        assert "batch occupancy mean" in srv.stderr()
    finally:
        srv.kill()


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.base}/metrics", timeout=60).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def concurrently(server: Server, prompts: list[str], max_tokens: int) -> dict[str, str]:
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(i: int, p: str) -> None:
        try:
            c = client(server)
            if i % 2:  # half of them streamed
                stream = c.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens, stream=True)
                results[p] = "".join(x.choices[0].text for x in stream)
            else:
                results[p] = c.completions.create(model=MODEL, prompt=p, max_tokens=max_tokens).choices[0].text
        except BaseException as exc:  # noqa: B036 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_concurrent_requests_batched_each_as_alone(server: Server, model: dict[str, Path], tmp_path: Path) -> None:
    c = client(server)
    alone = {p: c.completions.create(model=MODEL, prompt=p, max_tokens=16).choices[0].text for p in PROMPTS}
    before = metrics(server)
    together = concurrently(server, PROMPTS, 16)
    assert together == alone
    # ... and as tpi_mpi.run, which decodes one sequence with no batching at all
    assert alone[PROMPTS[6]] == run_record(model, tmp_path, N, [f"prompt='{PROMPTS[6]}'"], 16)["text"]
    m = metrics(server)
    assert m["tpi_serve_batch_slots"] == SLOTS
    passes = m["tpi_serve_batch_occupancy_count"] - before["tpi_serve_batch_occupancy_count"]
    full = passes - (m['tpi_serve_batch_occupancy_bucket{le="2.0"}']
                     - before['tpi_serve_batch_occupancy_bucket{le="2.0"}'])
    assert full > 0  # passes carried a full batch of 3 ...
    over = m['tpi_serve_batch_occupancy_count'] - m['tpi_serve_batch_occupancy_bucket{le="3.0"}']
    assert over == 0  # ... and never more: the other 4 of the 7 requests waited in the queue
    assert m["tpi_serve_tokens_per_second"] > 0
    assert m["tpi_serve_token_latency_seconds_count"] > before["tpi_serve_token_latency_seconds_count"]


def test_client_leaving_mid_batch_changes_nobody_else(server: Server) -> None:
    c = client(server)
    alone = {p: c.completions.create(model=MODEL, prompt=p, max_tokens=24).choices[0].text for p in PROMPTS[:3]}
    key = 'tpi_serve_requests_total{endpoint="completions",outcome="cancelled"}'
    before = metrics(server).get(key, 0.0)
    leaving = c.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=200, stream=True)
    chunks = iter(leaving)
    next(chunks)  # it is generating
    results: dict[str, str] = {}
    done = threading.Thread(target=lambda: results.update(concurrently(server, PROMPTS[:3], 24)))
    done.start()
    for _ in range(3):
        next(chunks)
    leaving.close()  # the client goes away while the others are in the batch
    done.join(timeout=300)
    assert results == alone
    deadline = time.monotonic() + 60
    cancelled = before
    while cancelled == before and time.monotonic() < deadline:
        cancelled = metrics(server).get(key, 0.0)
        time.sleep(0.05)
    assert cancelled == before + 1
    # Its slot is free again: three more at once are all served.
    assert concurrently(server, PROMPTS[3:6], 4).keys() == set(PROMPTS[3:6])


def test_prompt_cache_per_slot(server: Server, model: dict[str, Path], tmp_path: Path) -> None:
    """A conversation's second turn finds its first turn in its slot although other requests were served in
    between (in other slots), and answers as tpi_mpi.run does with no cache at all."""
    c = client(server)
    turn1 = [{"role": "user", "content": "What news from the court?"}]
    a1 = c.chat.completions.create(model=MODEL, messages=turn1, max_tokens=8)  # type: ignore[arg-type]
    assert a1.usage is not None
    concurrently(server, PROMPTS[:2], 4)  # two unrelated requests take the other slots
    turn2 = [*turn1, {"role": "assistant", "content": a1.choices[0].message.content or ""},
             {"role": "user", "content": "And then?"}]
    warm = c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=8)  # type: ignore[arg-type]
    assert warm.usage is not None and warm.usage.prompt_tokens_details is not None
    assert warm.usage.prompt_tokens_details.cached_tokens >= a1.usage.prompt_tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model["model"])
    ids = tok(tok.apply_chat_template(turn2, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False).input_ids
    cold = run_record(model, tmp_path, N, [f"prompt_ids=[{','.join(map(str, ids))}]"], 8)["text"]
    assert warm.choices[0].message.content == cold
