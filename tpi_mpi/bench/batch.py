"""Several users at once: B concurrent greedy streams decoded together (continuous batching) against one.

    python -m tpi_mpi.bench.batch [--preset llama2-7b] [--layers 4] [--dtypes fp16,bf16] [--world-sizes 1,2]
        [--batches 1,2,4,8] [--prompt-tokens 16] [--new-tokens 32] [--repeats 3] [--stream] [--threads T]
        [--workdir bench_out/tp_latency] [--shards SPLIT]

The checkpoint is tp_latency's (random weights of the preset's real layer shapes, --layers of them, cached
in the workdir), split once per dtype and world size. One mpirun per (dtype, N) loads the engine once with
max(--batches) KV cache slots; inside it every batch size runs in turn, round by round (--repeats rounds),
so the rows of one (dtype, N) are measured side by side. A run of B streams submits B different prompts
at once to tpi_mpi.batching.Batcher (the engine directly, not through the HTTP server) and decodes until
each has --new-tokens tokens. With --stream every rank streams every block from disk through a window of 2
(memory.resident=false; the read pages are evicted as they are copied, so every pass reads from the disk).
--shards SPLIT measures an existing split instead (its world size and dtype), e.g. bench.memory's
Llama-2-70B-shaped one: python -c "from pathlib import Path; from tpi_mpi.bench.memory import ensure_split;
ensure_split(Path('bench_out/memory'), 2, 8)" makes bench_out/memory/shards/llama2-70b-L2-fp16-n8.

Table columns (medians over the rounds):
    agg tok/s      tokens of all streams after their first / (last token - first token of the batch)
    x B=1          agg tok/s over the B=1 row's
    tok p50/p99    per-stream token latency (time between a stream's tokens), over every token of every stream
    lat x B=1      tok p50 over the B=1 row's
    TTFT ms        submission to first token, median over the streams (all B prompts prefill in one pass)
    bound ms       one decode pass's weight bytes on the busiest rank / the memory bandwidth measured here
    tok/GB         (--stream) tokens generated per GB of weights read from disk, all ranks together
One JSON line per (dtype, N, B, round) goes to --jsonl (default WORKDIR/batch.jsonl).

    python -m tpi_mpi.bench.batch --kernels [--repeats 5]

times, on one thread, the matrix products a pass is made of: [B, 4096] x W[11008, 4096] (Llama-2-7B's FFN)
for B = --batches, in fp32, fp16, bf16 and torch's packed int8 / int4 kernels (the kernels issue 15's
quantized weights use), over 4 distinct matrices in turn (so that they do not sit in the cache). Whether a
batch is nearly free is decided here: a kernel whose time grows with B gains nothing from batching.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tpi_mpi.bench.tp_latency import cores, ensure_checkpoint, prompt_ids, run_checked, warm_page_cache
from tpi_mpi.errors import main_guard


def ensure_split(workdir: Path, model: Path, n: int, dtype: str) -> Path:
    from tpi_mpi.weights.split import split

    out = workdir / "shards" / f"{model.name}-n{n}-{dtype}"
    if not out.is_dir():  # split renames into place only when complete
        print(f"splitting {model} for N={n} in {dtype} ...", file=sys.stderr, flush=True)
        split(model, out, n, None, dtype)
    return out


def bandwidth_gbs(size: int = 1 << 30) -> float:
    """Memory read bandwidth: torch sum over a fresh 1 GiB fp32 tensor, best of 3 (one thread per core)."""
    import torch

    x = torch.ones(size // 4)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return size / best / 1e9


def percentile(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(xs, q)) if xs else float("nan")


def worker(shards: str, out: str, batches: list[int], repeats: int, prompt_tokens: int, new: int,
           stream: bool, threads: int | None) -> None:
    """Under mpirun: the engine with max(batches) slots; rank 0 writes one record per (B, round)."""
    from mpi4py import MPI

    from tpi_mpi.batching import Batcher, Sequence
    from tpi_mpi.config import MemoryConfig
    from tpi_mpi.engine import RESIDENT, Master, Worker
    from tpi_mpi.generate import Sampler
    from tpi_mpi.job import set_threads, start_together
    from tpi_mpi.weights.memplan import plan_rank_memory
    from tpi_mpi.weights.shards import open_rank_shard

    comm = MPI.COMM_WORLD
    set_threads(comm, threads)
    shard = open_rank_shard(shards, comm.rank, comm.size, verify_checksums="none")
    slots = max(batches)
    plan = (plan_rank_memory(shard, MemoryConfig(resident=False, window=2), None, comm.rank == 0, slots)
            if stream else RESIDENT)
    if comm.rank != 0:
        w = Worker(comm, shard, "star", plan=plan, max_batch=slots)
        w.blocks.wait_filled()
        start_together(comm)
        w.serve()
        w.close()
        return
    master = Master(comm, shard, "star", plan=plan, max_batch=slots)
    master.blocks.wait_filled()
    start_together(comm)
    capacity = prompt_tokens + new
    # Different prompts per stream (shifted id sequences), the same for stream i whatever B.
    prompts = [[3 + (i + 37 * s) % 497 for i in prompt_ids(prompt_tokens)] for s in range(slots)]
    b = Batcher(master, capacity, prefill_chunk=slots * prompt_tokens)  # every prompt in the first pass
    for s in range(slots):  # warm-up: every slot's cache reserved, every code path run once
        b.submit(Sequence(prompts[s], 2, Sampler(False)))
    b.run()
    records = []
    for rnd in range(repeats):
        for bsz in batches:
            read0 = sum(r["bytes_read"] for r in master.report())
            seqs = [b.submit(Sequence(prompts[s], new, Sampler(False))) for s in range(bsz)]
            passes0 = b.stats.passes
            b.run()
            read = sum(r["bytes_read"] for r in master.report()) - read0
            first = max(s.token_times[0] for s in seqs)
            last = max(s.token_times[-1] for s in seqs)
            decoded = sum(len(s.tokens) - 1 for s in seqs)
            lat = [x for s in seqs for x in s.token_latencies_s]
            records.append({"batch": bsz, "round": rnd, "agg_tokens_per_s": decoded / (last - first),
                            "token_latency_p50_s": percentile(lat, 50), "token_latency_p99_s": percentile(lat, 99),
                            "ttft_s": statistics.median(s.ttft_s or 0.0 for s in seqs),
                            "ttft_max_s": max(s.ttft_s or 0.0 for s in seqs), "passes": b.stats.passes - passes0,
                            "tokens": [s.tokens for s in seqs], "loadavg_1m": os.getloadavg()[0],
                            "bytes_read": read, "tokens_per_gb_read": sum(len(s.tokens) for s in seqs) / read * 1e9
                            if read else None})
    master.stop()
    master.close()
    Path(out).write_text(json.dumps({"records": records, "rank_record": master.rank_record()}))


def kernels(batches: list[int], repeats: int) -> None:
    """The --kernels table: ms per product and the ratio to B=1, per kernel (medians of `repeats`)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    rows, cols, group = 11008, 4096, 128
    ws = [torch.randn(rows, cols) for _ in range(4)]

    def int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = w.reshape(rows, cols // group, group)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (hi - lo).clamp(min=1e-6) / 15
        q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
        sz = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8), sz

    def int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = w.abs().amax(1) / 127
        return (w / scale[:, None]).round().to(torch.int8), scale.to(torch.bfloat16)

    mats: dict[str, list] = {"fp32": ws, "fp16": [w.half() for w in ws], "bf16": [w.bfloat16() for w in ws],
                             "int8 (bf16 x)": [int8(w) for w in ws], "int4 (bf16 x)": [int4(w) for w in ws]}

    def product(kind: str, x: torch.Tensor, m: Any) -> None:
        if kind.startswith("int8"):
            torch.ops.aten._weight_int8pack_mm(x.bfloat16(), m[0], m[1])
        elif kind.startswith("int4"):
            torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), m[0], group, m[1])
        else:
            F.linear(x.to(m.dtype), m)

    print(f"[B, {cols}] x W[{rows}, {cols}], 1 thread, median of {repeats} over 4 matrices | load avg "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'kernel':14}" + "".join(f" {'B=' + str(b) + ' ms':>9} {'xB=1':>5}" for b in batches))
    for kind, ms in mats.items():
        times = []
        for b in batches:
            x = torch.randn(b, cols)
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for m in ms:
                    product(kind, x, m)
                runs.append((time.perf_counter() - t0) / len(ms))
            times.append(statistics.median(runs) * 1e3)
        print(f"{kind:14}" + "".join(f" {t:9.2f} {t / times[0]:5.2f}" for t in times))


def weight_bytes(shards: Path) -> int:
    """The busiest rank's layer weights and lm_head slice: what one decode pass reads from memory."""
    best = 0
    for rank in sorted(shards.glob("rank_*")):
        # Layer blocks and this rank's lm_head slice (head.safetensors is the whole head, for memory.head=master).
        best = max(best, sum(f.stat().st_size for f in rank.glob("*.safetensors")
                             if f.name.startswith("layer_") or f.name == "head_slice.safetensors"))
    return best


def measure(a: argparse.Namespace, dtype: str, n: int, shards: Path, stamp: str, gbs: float, jsonl: Path,
            batches: list[int]) -> list[dict[str, Any]]:
    """One mpirun of the worker for (dtype, N): its rows of the table (medians over the rounds)."""
    rows = []
    workdir = Path(a.workdir)
    if not a.stream:
        warm_page_cache(shards)
    out = workdir / "runs" / f"{stamp}-batch-{dtype}-n{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{dtype} N={n}: B={a.batches}, {a.repeats} rounds ...", file=sys.stderr, flush=True)
    mpirun = Path(sys.executable).with_name("mpirun")
    cmd = [str(mpirun) if mpirun.exists() else "mpirun", "-n", str(n), sys.executable, "-m",
           "tpi_mpi.bench.batch", "--worker", str(shards), str(out), "--batches", a.batches, "--repeats",
           str(a.repeats), "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
           *(["--stream"] if a.stream else []), *(["--threads", str(a.threads)] if a.threads else [])]
    run_checked(cmd, a.timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    recs = json.loads(out.read_text())["records"]
    bound_ms = weight_bytes(shards) / (gbs * 1e9) * 1e3
    with open(jsonl, "a") as f:
        for r in recs:
            f.write(json.dumps({"bench": "batch", "stream": a.stream, "preset": a.preset, "layers": a.layers,
                                "dtype": dtype, "world_size": n, "cores": cores(),
                                "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
                                "bandwidth_gbs": gbs, **r}) + "\n")
    for bsz in batches:
        mine = [r for r in recs if r["batch"] == bsz]
        rows.append({"dtype": dtype, "n": n, "b": bsz, "bound_ms": bound_ms,
                     "loads": [r["loadavg_1m"] for r in mine],
                     **{k: statistics.median(r[k] for r in mine) for k in
                        ("agg_tokens_per_s", "token_latency_p50_s", "token_latency_p99_s", "ttft_s")},
                     "tok_gb": statistics.median(r["tokens_per_gb_read"] or 0.0 for r in mine)})
    # Random weights give near-tied logits that batched rounding can flip: a note, not a failure.
    alone = next(r["tokens"][0] for r in recs if r["batch"] == batches[0])
    if any(r["tokens"][0] != alone for r in recs):
        print(f"note: {dtype} N={n}: stream 0's greedy tokens differ between batch sizes", file=sys.stderr)
    return rows


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.batch", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream", action="store_true", help="stream every block from disk (window 2)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores / ranks; 1 on a machine others load)")
    p.add_argument("--workdir", default="bench_out/tp_latency")
    p.add_argument("--shards", default=None, help="an existing split to measure (instead of --dtypes/--world-sizes)")
    p.add_argument("--jsonl", default=None, help="default: WORKDIR/batch.jsonl")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per mpirun")
    p.add_argument("--kernels", action="store_true", help="time the matrix-product kernels per batch size only")
    p.add_argument("--worker", nargs=2, metavar=("SHARDS", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    batches = [int(x) for x in a.batches.split(",")]
    if a.kernels:
        kernels(batches, a.repeats)
        return 0
    if a.worker:
        worker(a.worker[0], a.worker[1], batches, a.repeats, a.prompt_tokens, a.new_tokens, a.stream, a.threads)
        return 0

    workdir = Path(a.workdir)
    jsonl = Path(a.jsonl) if a.jsonl else workdir / "batch.jsonl"
    load0 = os.getloadavg()[0]
    if a.shards:
        given = Path(a.shards)
        n = len(list(given.glob("rank_*")))
        from tpi_mpi.weights.tensorfile import parse_header

        first = parse_header(sorted(given.glob("rank_0/layer_*.safetensors"))[0])
        kind = str(next(iter(first.entries.values())).torch_dtype).removeprefix("torch.")
        configs = [({"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(kind, kind), n, given)]
    else:
        model = ensure_checkpoint(workdir, a.preset, a.layers)
        configs = [(dtype, n, ensure_split(workdir, model, n, dtype)) for dtype in a.dtypes.split(",")
                   for n in (int(x) for x in a.world_sizes.split(","))]
    gbs = bandwidth_gbs()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for dtype, n, shards in configs:
        rows += measure(a, dtype, n, shards, stamp, gbs, jsonl, batches)
    loads = [x for r in rows for x in r["loads"]]
    what = str(a.shards) if a.shards else f"{a.preset}, {a.layers} layers"
    print(f"\n{what} | {cores()} cores | prompt {a.prompt_tokens} tok, {a.new_tokens} new "
          f"tok per stream | median of {a.repeats} rounds | engine directly (tpi_mpi.batching) | "
          f"{'streamed from disk, window 2' if a.stream else 'resident'} | "
          f"{a.threads or 'cores/ranks'} thread(s) per rank | memory "
          f"{gbs:.1f} GB/s | load avg {load0:.1f} before, {min(loads):.1f}-{max(loads):.1f} during")
    print(f"{'dtype':6} {'N':>2} {'B':>2} {'agg tok/s':>10} {'x B=1':>6} {'tok p50 ms':>10} {'tok p99 ms':>10} "
          f"{'lat x B=1':>9} {'TTFT ms':>8} {'bound ms':>8}" + (f" {'tok/GB':>7}" if a.stream else ""))
    for r in rows:
        one = next(x for x in rows if x["dtype"] == r["dtype"] and x["n"] == r["n"] and x["b"] == batches[0])
        print(f"{r['dtype']:6} {r['n']:>2} {r['b']:>2} {r['agg_tokens_per_s']:10.2f} "
              f"{r['agg_tokens_per_s'] / one['agg_tokens_per_s']:6.2f} {r['token_latency_p50_s'] * 1e3:10.1f} "
              f"{r['token_latency_p99_s'] * 1e3:10.1f} {r['token_latency_p50_s'] / one['token_latency_p50_s']:9.2f} "
              f"{r['ttft_s'] * 1e3:8.1f} {r['bound_ms']:8.1f}" + (f" {r['tok_gb']:7.2f}" if a.stream else ""))
    print(f"(per-round records: {jsonl})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
