"""Latency of tpi_mpi at several world sizes against Hugging Face transformers on one process.

    python -m tpi_mpi.bench.tp_latency [--preset llama2-7b] [--layers 4] [--world-sizes 1,2,4,8]
        [--prompt-tokens 16] [--new-tokens 16] [--repeats 3] [--workdir bench_out/tp_latency] [--jsonl FILE]

Makes a random-weight checkpoint of the preset's real layer shapes (only --layers of them) in the
workdir, splits it once per world size, then runs every world size under mpirun and the HF baseline
(greedy decoding with its KV cache, torch threads = the machine's cores) on the same checkpoint and
prompt ids. Every run is a fresh process, so TTFT includes the same cold-start effects for all rows;
every run generates exactly --new-tokens tokens (stop_on_eos=false).

Table columns (medians over repeats):
    TTFT ms       time to first token: prefill of the prompt plus the first greedy token
    tok p50 ms    per-run median latency of each later token
    tok/HF        tok p50 divided by the HF row's (below 1: faster than HF)
    TTFT/HF       TTFT divided by the HF row's
    RSS MiB       peak resident memory of the largest rank (HF: its one process)
    comm          mean over ranks of comm_s / (comm_s + compute_s): the share of forward time spent
                  in broadcast and allreduce
One JSON line per run goes to --jsonl (default WORKDIR/results.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tpi_mpi.errors import main_guard

HF_ROW = "HF transformers (1 process)"
KEPT = ("ttft_s", "token_latency_s", "tokens_per_s", "token_ids", "ranks")  # of each run's record


def cores() -> int:
    return len(os.sched_getaffinity(0))


def prompt_ids(n: int) -> list[int]:
    # Fixed pseudo-random ids in [3, 500): past the special tokens and inside even the tiny vocabulary.
    return [3 + (i * 7919 + 13) % 497 for i in range(n)]


def ensure_checkpoint(workdir: Path, preset: str, layers: int) -> Path:
    from tpi_mpi.make_model import make_model

    out = workdir / "models" / f"{preset}-L{layers}"
    if (out / "config.json").is_file():  # make_model renames into place only when complete
        if json.loads((out / "config.json").read_text())["num_hidden_layers"] == layers:
            return out
        raise SystemExit(f"{out} holds another number of layers: remove it")
    # An interrupted make_model leaves this behind and would refuse to start again.
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    print(f"making {preset} checkpoint with {layers} layers in {out} ...", file=sys.stderr, flush=True)
    return make_model(out, preset, "llama", layers, seed=0, dtype="fp32")


def ensure_split(workdir: Path, model: Path, n: int) -> Path:
    from tpi_mpi.weights.split import split

    out = workdir / "shards" / f"{model.name}-n{n}"
    if not out.is_dir():  # split renames into place only when complete
        print(f"splitting {model} for N={n} ...", file=sys.stderr, flush=True)
        split(model, out, n)
    return out


def warm_page_cache(d: Path) -> None:
    # The checkpoint and its splits together outgrow the page cache of a small machine, and the
    # weights are read lazily (mmap): without this a run's TTFT would include disk reads whose
    # amount depends on which runs came before it.
    for f in sorted(d.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def run_checked(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> None:
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from None
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-30:])
        raise SystemExit(f"exit code {p.returncode}: {' '.join(cmd)}\n{tail}")


def run_tpi(model: Path, shards: Path, n: int, ids: list[int], new: int, out: Path, timeout: float,
            extra: list[str] | None = None, env: dict[str, str] | None = None) -> dict:
    cmd = [str(Path(sys.executable).with_name("mpirun")), "-n", str(n), sys.executable, "-m", "tpi_mpi.run",
           f"model.path={model}",
           f"model.shards={shards}", f"prompt_ids=[{','.join(map(str, ids))}]",
           f"generation.max_new_tokens={new}", "generation.do_sample=false", "generation.stop_on_eos=false",
           "logging.quiet=true", "threads=null", f"output.json={out}", "output.results=null",
           f"hydra.run.dir={out.parent / 'hydra' / out.stem}", *(extra or [])]
    run_checked(cmd, timeout, env=env)
    return json.loads(out.read_text())


def run_hf(model: Path, ids: list[int], new: int, out: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "tpi_mpi.bench.tp_latency", "--hf-worker", "--model", str(model),
           "--prompt-ids", ",".join(map(str, ids)), "--new-tokens", str(new), "--out", str(out)]
    run_checked(cmd, timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return json.loads(out.read_text())


def hf_worker(model: str, ids: list[int], new: int, out: str) -> None:
    """Greedy decoding with HF's KV cache, timed the way tpi_mpi's generate() times its own."""
    import resource

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(cores())
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    tokens, lat = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        o = m(input_ids=torch.tensor([ids]), use_cache=True)
        tok = int(torch.argmax(o.logits[0, -1]))
        ttft = time.perf_counter() - t0
        tokens.append(tok)
        past = o.past_key_values
        while len(tokens) < new:
            t1 = time.perf_counter()
            o = m(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            tok = int(torch.argmax(o.logits[0, -1]))
            lat.append(time.perf_counter() - t1)
            tokens.append(tok)
            past = o.past_key_values
    record = {
        "prompt_tokens": len(ids), "generated_tokens": len(tokens), "token_ids": tokens, "ttft_s": ttft,
        "token_latency_s": {k: float(f(lat)) if lat else None for k, f in
                            (("mean", np.mean), ("p50", np.median), ("p90", lambda x: np.percentile(x, 90)))},
        "tokens_per_s": len(lat) / sum(lat) if lat else None, "world_size": 1,
        "ranks": [{"rank": 0, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                   "compute_s": ttft + sum(lat), "comm_s": 0.0}],
    }
    Path(out).write_text(json.dumps(record, indent=1))


def summarize(records: list[dict]) -> dict:
    def med(f: Callable[[dict], float]) -> float:
        return statistics.median(f(r) for r in records)

    return {
        "ttft_ms": med(lambda r: r["ttft_s"] * 1e3),
        "tok_ms": med(lambda r: (r["token_latency_s"]["p50"] or 0.0) * 1e3),
        "rss_mib": med(lambda r: max(x["peak_rss_bytes"] for x in r["ranks"]) / 2**20),
        "comm": med(lambda r: statistics.mean(x["comm_s"] / ((x["comm_s"] + x["compute_s"]) or 1)
                                              for x in r["ranks"])),
    }


def ratio(x: float, ref: float) -> float:
    return x / ref if ref else float("nan")  # --new-tokens 1 leaves no later tokens to time


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.tp_latency",
                                description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--world-sizes", default="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="bench_out/tp_latency")
    p.add_argument("--jsonl", default=None, help="default: WORKDIR/results.jsonl")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    # Internal: the HF baseline runs in its own process, like every tpi_mpi run.
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.hf_worker:
        hf_worker(a.model, [int(x) for x in a.prompt_ids.split(",")], a.new_tokens, a.out)
        return 0

    workdir = Path(a.workdir)
    jsonl = Path(a.jsonl) if a.jsonl else workdir / "results.jsonl"
    sizes = [int(x) for x in a.world_sizes.split(",")]
    ids = prompt_ids(a.prompt_tokens)
    # Other work on the machine skews every row; the load average before we start shows any.
    load0 = os.getloadavg()[0]
    model = ensure_checkpoint(workdir, a.preset, a.layers)
    shards = {n: ensure_split(workdir, model, n) for n in sizes}
    rows: dict[str, list[dict]] = {HF_ROW: [], **{f"tpi_mpi N={n}": [] for n in sizes}}
    runs = [(n, rep) for rep in range(1, a.repeats + 1) for n in [*sizes, None]]  # None: HF
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i, (n, rep) in enumerate(runs, 1):
        name, short, tag = (HF_ROW, "HF", "hf") if n is None else (f"tpi_mpi N={n}", f"N={n}", f"n{n}")
        print(f"[{i}/{len(runs)}] {short} repeat {rep} ...", file=sys.stderr, flush=True)
        out = workdir / "runs" / f"{stamp}-{tag}-r{rep}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        warm_page_cache(model if n is None else shards[n])
        load = os.getloadavg()[0]
        rec = (run_hf(model, ids, a.new_tokens, out, a.timeout) if n is None
               else run_tpi(model, shards[n], n, ids, a.new_tokens, out, a.timeout))
        rows[name].append(rec)
        line = {"bench": "tp_latency", "impl": "hf" if n is None else "tpi_mpi", "world_size": n or 1,
                "repeat": rep, "preset": a.preset, "layers": a.layers, "cores": cores(),
                "prompt_ids": ids, "new_tokens": a.new_tokens,
                "loadavg_1m_before": load, **{k: rec.get(k) for k in KEPT}}
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(jsonl, "a") as f:
            f.write(json.dumps(line) + "\n")

    # A sanity check, not a failure: random weights give near-tied logits that rounding can flip.
    for name, recs in rows.items():
        if any(r["token_ids"] != rows[HF_ROW][0]["token_ids"] for r in recs):
            print(f"note: {name} generated other tokens than the first HF run", file=sys.stderr)
    stats = {name: summarize(recs) for name, recs in rows.items()}
    hf = stats[HF_ROW]
    print(f"\n{a.preset}, {a.layers} layers, fp32 | {cores()} cores | prompt {a.prompt_tokens} tok, "
          f"{a.new_tokens} new tok | median of {a.repeats} repeat(s) | load avg before {load0:.2f}")
    print(f"{'':28} {'TTFT ms':>9} {'tok p50 ms':>10} {'tok/HF':>7} {'TTFT/HF':>8} {'RSS MiB':>8} "
          f"{'comm':>6}")
    for name, s in stats.items():
        comm = "-" if name == HF_ROW else f"{s['comm']:.0%}"
        print(f"{name:28} {s['ttft_ms']:9.1f} {s['tok_ms']:10.1f} {ratio(s['tok_ms'], hf['tok_ms']):7.2f} "
              f"{ratio(s['ttft_ms'], hf['ttft_ms']):8.2f} {s['rss_mib']:8.0f} {comm:>6}")
    print(f"(per-run records: {jsonl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
