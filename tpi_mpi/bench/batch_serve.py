"""B concurrent greedy streams through the server (`tpi_mpi.serve serve.max_batch=max(B)`), against one.

    python -m tpi_mpi.bench.batch_serve [--dtypes bf16] [--world-sizes 1,2] [--batches 1,2,4,8]
        [--prompt-tokens 16] [--new-tokens 16] [--repeats 3] [--threads 1] [--workdir bench_out/tp_latency]

The same checkpoint and splits as tpi_mpi.bench.batch (its cache), the same prompts (token ids, so no
tokenizer decides their length), every request streamed over HTTP from its own client thread, all B at
once; one server per (dtype, N), B = 1, 2, 4, 8 in turn, round by round. Random weights give tokens that
are often pieces of a character, which the server holds back until the character is whole, so the chunks a
client sees do not time single tokens; hence:
    agg tok/s      client side, end to end: all tokens of the round / (last stream done - requests sent)
    token ms       server side: the mean time between a sequence's tokens over the round (/metrics,
                   tpi_serve_token_latency_seconds sum / count)
    TTFT ms        server side: arrival to first token, mean over the round's requests (tpi_serve_ttft_seconds)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tpi_mpi.bench.batch import ensure_split
from tpi_mpi.bench.serve import ServerProcess
from tpi_mpi.bench.tp_latency import cores, ensure_checkpoint, prompt_ids, warm_page_cache
from tpi_mpi.errors import main_guard

MODEL = "bench"


def one_stream(host: str, port: int, ids: list[int], new: int, go: threading.Barrier) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=3600)
    body = json.dumps({"model": MODEL, "prompt": ids, "max_tokens": new, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    go.wait()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{r.status} {r.read()[:200]!r}")
    tokens = 0
    for raw in r:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            break
        if not line.startswith("data: "):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise RuntimeError(chunk["error"]["message"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter()
    conn.close()
    return {"sent": t0, "done": done, "tokens": tokens}


def server_sums(host: str, port: int) -> dict[str, float]:
    """The sums and counts of the server's token latency and TTFT histograms (/metrics)."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for h in ("token_latency", "ttft"):
        for k in ("sum", "count"):
            m = re.search(rf"^tpi_serve_{h}_seconds_{k} (\S+)", text, re.M)
            assert m, f"no tpi_serve_{h}_seconds_{k} in /metrics"
            out[f"{h}_{k}"] = float(m.group(1))
    return out


def one_round(host: str, port: int, prompts: list[list[int]], new: int) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    go = threading.Barrier(len(prompts))

    def client(ids: list[int]) -> None:
        try:
            results.append(one_stream(host, port, ids, new, go))
        except BaseException as exc:  # noqa: B036 - raised below
            errors.append(exc)

    before = server_sums(host, port)
    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    d = {k: v - before[k] for k, v in server_sums(host, port).items()}
    span = max(r["done"] for r in results) - min(r["sent"] for r in results)
    return {"batch": len(prompts), "agg_tokens_per_s": sum(r["tokens"] for r in results) / span,
            "token_latency_s": d["token_latency_sum"] / d["token_latency_count"] if d["token_latency_count"]
            else float("nan"), "ttft_s": d["ttft_sum"] / d["ttft_count"], "loadavg_1m": os.getloadavg()[0]}


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.batch_serve", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--workdir", default="bench_out/tp_latency")
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]
    workdir = Path(a.workdir)
    load0 = os.getloadavg()[0]
    model = ensure_checkpoint(workdir, a.preset, a.layers)
    slots = max(batches)
    prompts = [[3 + (i + 37 * s) % 497 for i in prompt_ids(a.prompt_tokens)] for s in range(slots)]
    rows = []
    for dtype in a.dtypes.split(","):
        for n in (int(x) for x in a.world_sizes.split(",")):
            shards = ensure_split(workdir, model, n, dtype)
            warm_page_cache(shards)
            print(f"server {dtype} N={n}: B={a.batches}, {a.repeats} rounds ...", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                srv = ServerProcess(n, model, Path(tmp), [
                    f"model.shards={shards}", f"serve.model_name={MODEL}", f"serve.max_batch={slots}",
                    f"serve.max_tokens={a.new_tokens}", f"serve.queue_size={2 * slots}",
                    f"memory.kv_cache_tokens={a.prompt_tokens + a.new_tokens}", "generation.stop_on_eos=false",
                    f"threads={a.threads}", "output.results=null"])
                try:
                    one_round(srv.host, srv.port, prompts, 2)  # warm-up: every slot used once
                    recs = [one_round(srv.host, srv.port, prompts[:b], a.new_tokens)
                            for _ in range(a.repeats) for b in batches]
                finally:
                    srv.stop()
            for b in batches:
                mine = [r for r in recs if r["batch"] == b]
                rows.append({"dtype": dtype, "n": n, "b": b, "loads": [r["loadavg_1m"] for r in mine],
                             **{k: statistics.median(r[k] for r in mine) for k in
                                ("agg_tokens_per_s", "token_latency_s", "ttft_s")}})
    loads = [x for r in rows for x in r["loads"]]
    print(f"\n{a.preset}, {a.layers} layers | {cores()} cores | prompt {a.prompt_tokens} tok, {a.new_tokens} new tok "
          f"per stream | median of {a.repeats} rounds | through the server (HTTP, streamed) | {a.threads} thread(s) "
          f"per rank | load avg {load0:.1f} before, {min(loads):.1f}-{max(loads):.1f} during")
    print(f"{'dtype':6} {'N':>2} {'B':>2} {'agg tok/s':>10} {'x B=1':>6} {'token ms':>9} {'lat x B=1':>9} "
          f"{'TTFT ms':>8}")
    for r in rows:
        one = next(x for x in rows if x["dtype"] == r["dtype"] and x["n"] == r["n"] and x["b"] == batches[0])
        print(f"{r['dtype']:6} {r['n']:>2} {r['b']:>2} {r['agg_tokens_per_s']:10.2f} "
              f"{r['agg_tokens_per_s'] / one['agg_tokens_per_s']:6.2f} {r['token_latency_s'] * 1e3:9.1f} "
              f"{r['token_latency_s'] / one['token_latency_s']:9.2f} {r['ttft_s'] * 1e3:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
