"""Serving benchmark on localhost: a bounded load test, the prompt cache's TTFT, and the server's token latency
against `tpi_mpi.run`, all against a real `mpirun -n N python -m tpi_mpi.serve` (docs/serving.md).

    python -m tpi_mpi.bench.serve                       # tiny model (2048 positions), 2 ranks, 200 requests
    python -m tpi_mpi.bench.serve --model DIR --ranks 4 --requests 200 --clients 8

1. Load: --requests streamed completions from --clients threads at once, prompts of mixed lengths (8 to
   ~400 tokens) and max_tokens 16..64: requests lost (no final chunk), errors, latency and TTFT p50/p99 as
   the client sees them, generated tokens per second over the whole test.
2. Prompt cache: a chat whose history is long (~1500 tokens); the TTFT of a follow-up turn with the history
   in the KV cache against the same turn after an unrelated request emptied it (target <= 0.3x).
3. Token latency: the same prompt and length streamed through the server (client side: from the first to the
   last chunk), not streamed (the server's own figure, from /metrics) and with `tpi_mpi.run` (its own figure),
   alternated --repeats times (target <= 1.05x).
Standard library client (http.client), so it needs nothing beyond the server's dependencies.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tpi_mpi.errors import main_guard

CHAT_TEMPLATE = (  # speaker headings, as the trained demo model's (used for a model without a template)
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[{{ message['content'] | trim }}]\n\n"
    "{% elif message['role'] == 'user' %}User.\n{{ message['content'] | trim }}\n\n"
    "{% else %}Assistant.\n{{ message['content'] | trim }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant.\n{% endif %}"
)
WORDS = ("the king my lord good sir what news from court we shall go now and see her grace tonight "
         "but stay I pray you tell me more of this strange tale").split()


def bench_model(root: Path) -> Path:
    """tiny with 2048 positions (room for a long chat history) and a chat template; made once, then reused."""
    from transformers import AutoTokenizer

    from tpi_mpi.make_model import make_model

    path = root / "tiny-2k-chat"
    if not (path / "config.json").is_file():
        make_model(path, "tiny", "llama", seed=7, overrides={"max_position_embeddings": 2048})
        tok = AutoTokenizer.from_pretrained(path)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(path)
    return path


def text_of(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


class ServerProcess:
    def __init__(self, ranks: int, model: Path, tmp: Path, overrides: list[str]):
        mpirun = str(Path(sys.executable).with_name("mpirun"))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [mpirun, "-n", str(ranks), sys.executable, "-m", "tpi_mpi.serve", f"hydra.run.dir={tmp}/hydra",
             f"model.path={model}", f"model.cache_dir={tmp}/shards", "serve.port=0", *overrides],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            line = lines.get(timeout=600)
            if line is None:
                break
            m = re.search(r"on http://([\d.]+):(\d+)/v1 ", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                return
        self.stop()
        raise RuntimeError("the server did not start")

    def _read(self, lines: queue.Queue[str | None]) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            sys.stderr.write(line)
            lines.put(line)
        lines.put(None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def stream(host: str, port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: {'ok', 'ttft_s', 'latency_s', 'tokens', 'first_to_last_s', 'cached', 'text'}."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    res: dict[str, Any] = {"ok": False, "text": ""}
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            res["error"] = f"{r.status} {r.read()[:200]!r}"
            return res
        first = last = None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                res["ok"] = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                res["error"] = chunk["error"]["message"]
                break
            if chunk.get("usage"):
                res["tokens"] = chunk["usage"]["completion_tokens"]
                res["cached"] = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                continue
            c = chunk["choices"][0]
            piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
            if piece:
                now = time.perf_counter()
                first = first or now
                last = now
                res["text"] += piece
        res["ttft_s"] = (first - t0) if first else None
        res["first_to_last_s"] = (last - first) if first and last else None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        res["error"] = repr(exc)
    finally:
        conn.close()
        res["latency_s"] = time.perf_counter() - t0
    return res


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def load_test(host: str, port: int, model: str, requests: int, clients: int) -> dict[str, Any]:
    todo: queue.Queue[int] = queue.Queue()
    for i in range(requests):
        todo.put(i)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            words = (4, 16, 60, 150, 280)[i % 5]  # mixed prompt lengths
            r = stream(host, port, "/v1/completions", {"model": model, "prompt": text_of(words, i),
                                                        "max_tokens": (16, 32, 64)[i % 3]})
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    lat, ttft = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    return {"requests": requests, "clients": clients, "answered": len(results), "lost": requests - len(results),
            "errors": len(results) - len(ok), "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "wall_s": wall,
            "tokens_per_s": sum(r.get("tokens", 0) for r in ok) / wall,
            "error_samples": [r.get("error") for r in results if not r["ok"]][:3]}


def cache_ttft(host: str, port: int, model: str, repeats: int) -> dict[str, Any]:
    history = []
    for i in range(8):  # a long conversation (~1500 tokens with the tiny tokenizer)
        history += [{"role": "user", "content": text_of(40, i)}, {"role": "assistant", "content": text_of(30, i + 50)}]
    turn = [*history, {"role": "user", "content": "and what then?"}]
    warm, cold, cached_w, cached_c = [], [], [], []
    for _ in range(repeats):
        stream(host, port, "/v1/chat/completions", {"model": model, "messages": history[:-1], "max_tokens": 1})
        w = stream(host, port, "/v1/chat/completions", {"model": model, "messages": turn, "max_tokens": 4})
        stream(host, port, "/v1/completions", {"model": model, "prompt": [7, 8, 9], "max_tokens": 1})  # empty it
        c = stream(host, port, "/v1/chat/completions", {"model": model, "messages": turn, "max_tokens": 4})
        if not (w["ok"] and c["ok"]):
            raise RuntimeError(f"a chat request failed: {w.get('error') or c.get('error')}")
        warm.append(w["ttft_s"])
        cold.append(c["ttft_s"])
        cached_w.append(w.get("cached"))
        cached_c.append(c.get("cached"))
    return {"ttft_cached_s": statistics.median(warm), "ttft_cold_s": statistics.median(cold),
            "ratio": statistics.median(warm) / statistics.median(cold), "cached_tokens": cached_w[-1],
            "cold_cached_tokens": cached_c[-1], "repeats": repeats}


def server_token_latency(host: str, port: int, body: dict[str, Any]) -> float:
    """A request not streamed: its mean time between tokens as the server measured it (/metrics)."""
    def histogram() -> tuple[float, float]:
        conn = http.client.HTTPConnection(host, port, timeout=600)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        total = re.search(r"^tpi_serve_token_latency_seconds_sum (\S+)", text, re.M)
        count = re.search(r"^tpi_serve_token_latency_seconds_count (\S+)", text, re.M)
        assert total and count
        return float(total.group(1)), float(count.group(1))

    s0, c0 = histogram()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    assert conn.getresponse().read()
    conn.close()
    s1, c1 = histogram()
    return (s1 - s0) / (c1 - c0)


def run_token_latency(ranks: int, model: Path, tmp: Path, prompt: str, new: int) -> float:
    mpirun = str(Path(sys.executable).with_name("mpirun"))
    out = tmp / "run.json"
    subprocess.run([mpirun, "-n", str(ranks), sys.executable, "-m", "tpi_mpi.run", f"hydra.run.dir={tmp}/hydra-run",
                    f"model.path={model}", f"model.cache_dir={tmp}/shards", f"prompt='{prompt}'",
                    f"generation.max_new_tokens={new}", "generation.stop_on_eos=false", "logging.quiet=true",
                    f"output.json={out}", "output.results=null"],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    return float(json.loads(out.read_text())["token_latency_s"]["mean"])


@main_guard
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint with a chat template (default: tiny-2k)")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="of the cache and the token latency comparisons")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens of the token latency comparison")
    ap.add_argument("--cache", type=Path, default=Path("bench_out/serve"), help="where the model is kept")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    model = args.model or bench_model(args.cache)
    name = model.resolve().name
    prompt = text_of(20, 3)
    with tempfile.TemporaryDirectory(prefix="tpi-bench-serve-") as d:
        tmp = Path(d)
        srv = ServerProcess(args.ranks, model, tmp, [f"serve.queue_size={args.clients}", "serve.max_tokens=256",
                                                     "generation.stop_on_eos=false"])
        try:
            load = load_test(srv.host, srv.port, name, args.requests, args.clients)
            cache = cache_ttft(srv.host, srv.port, name, args.repeats)
            server_tl, whole_tl, run_tl = [], [], []
            body = {"model": name, "prompt": prompt, "max_tokens": args.tokens}
            for _ in range(args.repeats):  # alternated, so that all three see the same load
                r = stream(srv.host, srv.port, "/v1/completions", body)
                server_tl.append(r["first_to_last_s"] / (r["tokens"] - 1))
                whole_tl.append(server_token_latency(srv.host, srv.port, body))
                run_tl.append(run_token_latency(args.ranks, model, tmp, prompt, args.tokens))
        finally:
            srv.stop()
    tl = {"server_s": statistics.median(server_tl), "run_s": statistics.median(run_tl),
          "server_whole_s": statistics.median(whole_tl),
          "ratio": statistics.median(server_tl) / statistics.median(run_tl),
          "ratio_whole": statistics.median(whole_tl) / statistics.median(run_tl), "repeats": args.repeats,
          "tokens": args.tokens, "samples_ms": {"streamed": [x * 1e3 for x in server_tl],
                                                "not_streamed": [x * 1e3 for x in whole_tl],
                                                "run": [x * 1e3 for x in run_tl]}}
    result = {"model": str(model), "ranks": args.ranks, "load": load, "prompt_cache": cache, "token_latency": tl,
              "load_average": os.getloadavg()}
    ms = 1e3
    print(f"\nserving benchmark: {name}, {args.ranks} ranks, load average {os.getloadavg()[0]:.1f}")
    print("| measure | value |\n|---|---|")
    print(f"| load test | {load['requests']} requests, {load['clients']} clients: {load['lost']} lost, "
          f"{load['errors']} errors |")
    print(f"| latency p50 / p99 | {load['latency_p50_s'] * ms:.0f} / {load['latency_p99_s'] * ms:.0f} ms |")
    print(f"| TTFT p50 / p99 | {load['ttft_p50_s'] * ms:.0f} / {load['ttft_p99_s'] * ms:.0f} ms |")
    print(f"| throughput | {load['tokens_per_s']:.1f} generated tokens/s ({load['wall_s']:.1f} s) |")
    print(f"| follow-up turn TTFT, history cached / not | {cache['ttft_cached_s'] * ms:.1f} / "
          f"{cache['ttft_cold_s'] * ms:.1f} ms = {cache['ratio']:.2f}x ({cache['cached_tokens']} tokens cached) |")
    print(f"| token latency, streamed through the server (client side) / tpi_mpi.run | {tl['server_s'] * ms:.2f} / "
          f"{tl['run_s'] * ms:.2f} ms = {tl['ratio']:.3f}x |")
    print(f"| token latency, not streamed (server side) / tpi_mpi.run | {tl['server_whole_s'] * ms:.2f} / "
          f"{tl['run_s'] * ms:.2f} ms = {tl['ratio_whole']:.3f}x |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
