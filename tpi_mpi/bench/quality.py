"""What each weight format and wire dtype costs in quality, on the trained model: held-out perplexity (computed by
our engine, python -m tpi_mpi.eval) and greedy agreement with fp32 (tokens generated before the first that differs
from fp32's, for several prompts).

    nice -n 10 python -m tpi_mpi.bench.quality [--model checkpoints/shakespeare]
        [--formats fp32,fp16,bf16,int8,int8@torch,int4-g32,int4-g64,int4-g64@torch,int4-g128]
        [--comm-dtypes fp16,int8] [--world-size 2] [--new-tokens 64] [--workdir bench_out/quality]

Weight formats run on one rank (the format changes the numbers, not the world size); wire dtypes (comm.dtype,
the partial sums on the wire) on --world-size ranks with fp32 weights, against fp32 on the wire at that size.
FMT@KERNEL runs FMT with model.kernel=KERNEL (@torch: torch's
kernels, bf16 activations, int4 in torch's layout; plain FMT: our kernels, int8 activations, where they build, on
AVX-512 VNNI where the CPU has it; @avx2: ours held to their AVX2 products, TPI_MPI_KERNEL_ISA=avx2).
Every split is made once in the workdir. The table is printed in markdown (docs/quantization.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tpi_mpi.bench.formats import entry_kernel, split_kernel  # FMT@KERNEL, as bench.formats reads it
from tpi_mpi.errors import main_guard

PROMPTS = [
    "ROMEO:", "To be, or not to be", "KING HENRY:", "Friends, Romans, countrymen, lend me your ears;",
    "Now is the winter of our discontent", "All the world's a stage,", "What light through yonder window breaks?",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
]


def mpirun(n: int, args: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("mpirun")), "-n", str(n), sys.executable, *args]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if p.returncode != 0:
        raise SystemExit(f"exit code {p.returncode}: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p


def ensure_split(workdir: Path, model: Path, n: int, entry: str) -> Path:
    """The split of a --formats entry, FMT or FMT@KERNEL (int4's layout follows the kernel)."""
    from tpi_mpi.weights.formats import parse_weight_format
    from tpi_mpi.weights.split import split

    fmt = entry.partition("@")[0]
    dtype, spec = parse_weight_format(fmt)
    kernel = split_kernel(entry)
    out = workdir / "shards" / f"{model.name}-n{n}-{fmt}{'-' + kernel if kernel and spec.format == 'int4' else ''}"
    if not out.is_dir():
        split(model, out, n, dtype=dtype, quant_format=spec.format, group_size=spec.group_size,
              kernel=kernel or "auto")
    return out


def perplexity(shards: Path, n: int, wire: str, kernel: tuple[str, dict[str, str]], out: Path,
               timeout: float) -> float:
    mpirun(n, ["-m", "tpi_mpi.eval", f"model.shards={shards}", f"comm.dtype={wire}", f"model.kernel={kernel[0]}",
               f"output.json={out}", "output.results=null", f"hydra.run.dir={out.parent / 'hydra'}"], timeout,
           kernel[1])
    return float(json.loads(out.read_text())["perplexity"])


def greedy(shards: Path, n: int, wire: str, kernel: tuple[str, dict[str, str]], new_tokens: int, out: Path,
           timeout: float) -> list[list[int]]:
    mpirun(n, ["-m", "tpi_mpi.bench.quality", "--worker", str(shards), "--wire", wire, "--kernel", kernel[0],
               "--new-tokens", str(new_tokens), "--out", str(out)], timeout, kernel[1])
    return json.loads(out.read_text())["tokens"]


def worker(shards: str, wire: str, kernel: str, new_tokens: int, out: str) -> None:
    """Under mpirun: greedy generation of every prompt in PROMPTS; rank 0 writes the token ids."""
    from mpi4py import MPI

    from tpi_mpi.engine import Master, Worker
    from tpi_mpi.generate import Sampler, generate
    from tpi_mpi.job import set_threads
    from tpi_mpi.models.linear import select_kernel
    from tpi_mpi.weights.shards import open_rank_shard

    comm = MPI.COMM_WORLD
    set_threads(comm, None)
    shard = open_rank_shard(shards, comm.rank, comm.size)
    select_kernel(kernel, shard.quant)
    if comm.rank != 0:
        Worker(comm, shard, "star", wire=wire).serve()
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(shards) / "rank_0"))
    master = Master(comm, shard, "star", wire=wire)
    tokens = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        tokens.append(generate(master, ids, new_tokens, Sampler(False), eos_ids=set()).tokens)
    master.stop()
    Path(out).write_text(json.dumps({"tokens": tokens}))


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> list[int]:
    """Per prompt: tokens generated before the first that differs from the reference's."""
    out = []
    for a, b in zip(tokens, ref, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        out.append(same)
    return out


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="checkpoints/shakespeare")
    p.add_argument("--formats", default="fp32,fp16,bf16,int8,int8@torch,int4-g32,int4-g64,int4-g64@torch,int4-g128")
    p.add_argument("--comm-dtypes", default="fp16,int8", help="wire dtypes besides fp32 (those this build has)")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the wire dtype runs")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--workdir", default="bench_out/quality")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--wire", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--kernel", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.worker, a.wire, a.kernel, a.new_tokens, a.out)
        return 0
    from tpi_mpi.comm.allreduce import WIRE_DTYPES

    model, workdir = Path(a.model), Path(a.workdir)
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is not a checkpoint: train it first (docs/trained_model.md)")
    runs: list[tuple[str, str, int]] = [(f, "fp32", 1) for f in a.formats.split(",")]
    wires = [w for w in a.comm_dtypes.split(",") if w]
    skipped = [w for w in wires if w not in WIRE_DTYPES]
    runs += [("fp32", "fp32", a.world_size)] + [("fp32", w, a.world_size) for w in wires if w in WIRE_DTYPES]
    load0 = os.getloadavg()[0]
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    for fmt, wire, n in runs:
        print(f"  {fmt} weights, {wire} on the wire, N={n} ...", file=sys.stderr, flush=True)
        shards = ensure_split(workdir, model, n, fmt)
        tag = workdir / "runs" / f"{fmt}-{wire}-n{n}"
        tag.mkdir(parents=True, exist_ok=True)
        kernel = entry_kernel(fmt)
        results[(fmt, wire, n)] = {"ppl": perplexity(shards, n, wire, kernel, tag / "eval.json", a.timeout),
                                   "tokens": greedy(shards, n, wire, kernel, a.new_tokens, tag / "greedy.json",
                                                    a.timeout)}
    ref = results[("fp32", "fp32", 1)]
    print(f"\n{model} | held-out perplexity by tpi_mpi.eval; greedy agreement: tokens before the first that differs "
          f"from fp32's (fp32 weights on 1 rank; wire rows: fp32 on the wire at N={a.world_size}), {len(PROMPTS)} "
          f"prompts x {a.new_tokens} new tokens | load average {load0:.1f}")
    print("\n| weights | comm.dtype | N | perplexity | vs fp32 | greedy agreement: mean / min tokens | "
          "prompts all equal |\n|---|---|---|---|---|---|---|")
    for (fmt, wire, n), r in results.items():
        base = results[("fp32", "fp32", n)] if wire != "fp32" else ref
        same = agreement(r["tokens"], base["tokens"])
        print(f"| {fmt} | {wire} | {n} | {r['ppl']:.3f} | {r['ppl'] / ref['ppl'] - 1:+.2%} | "
              f"{statistics.mean(same):.1f} / {min(same)} | {sum(s == a.new_tokens for s in same)}/{len(same)} |")
    if skipped:
        print(f"(comm.dtype {', '.join(skipped)}: not in this build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
