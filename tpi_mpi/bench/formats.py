"""Decoding and prefill at every weight format against the memory-bandwidth bound, measured side by side.

    nice -n 10 python -m tpi_mpi.bench.formats [--preset llama2-7b] [--layers 4] [--world-sizes 1,2]
        [--formats fp32,fp16,int8,int8@torch,int4-g32,int4-g64,int4-g64@torch,int4-g128]
        [--prompt-tokens 16] [--new-tokens 16] [--repeats 3] [--workdir bench_out/tp_latency]
    nice -n 10 python -m tpi_mpi.bench.formats --stream70b [--layers 4] [--workdir bench_out/memory]

Default mode: the random-weight checkpoint of bench.tp_latency (the preset's real layer shapes, --layers of them,
fp32; made once in the same cache folder and reused), split once per format and world size; then for each
repeat, every (world size, format) in turn (interleaved, so slow drifts of the machine hit all rows alike), one
`mpirun -n N python -m tpi_mpi.run` with resident weights, torch threads = cores / N (2 threads in all here),
greedy, exactly --new-tokens tokens. A format FMT@KERNEL runs FMT with model.kernel=KERNEL (int8@torch,
int4-g64@torch: torch's kernels, int4 on a split in torch's layout, beside the hand-written ones that
model.kernel=auto picks); FMT@avx2 runs our kernels with their AVX2 products on a CPU that has AVX-512 VNNI
(TPI_MPI_KERNEL_ISA=avx2, kernels/native.py), to show what VNNI is worth. Columns (medians over repeats):
    TTFT ms        prefill of the prompt and the first token
    token ms       per-run median latency of the later tokens
    MB/token/rank  weight bytes one decoding step reads per rank: every layer block and its lm_head rows
    bound ms       all ranks' bytes per token / the read bandwidth of the machine (torch sum over a 2 GiB fp32
                   tensor with all cores: the memory bus the ranks share), measured in this same run, on 4 KiB
                   pages and on huge pages (where the ranks hold their weights): the higher of the two
    ratio          token ms / bound ms
The targets of issue 15 are checked at the end (decode <= 1.2 x bound for fp16/int8/int4, absolute token
latencies, fp32 TTFT, int4 at N=2 faster than N=1).

--stream70b: the Llama-2-70B-shaped model of bench.memory (fp16, --layers layers, N=8) and its int4 split,
streamed with memory.window=2 from a cold page cache, fp16 and int4 interleaved: token latency, the ratio int4 /
fp16 (target <= 0.35; bytes ~0.28), bytes read per token per rank, and peak memory at 80 layers per device.
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

from tpi_mpi.bench.tp_latency import cores, ensure_checkpoint, prompt_ids, run_tpi
from tpi_mpi.errors import UserError, main_guard
from tpi_mpi.kernels.native import ISA_ENV
from tpi_mpi.weights.formats import parse_weight_format

TARGET_MS = {"fp32": 98.0, "fp16": 50.0, "int8": 25.0, "int4": 17.0}  # llama.cpp here (issue 15)
TTFT_FP32_MS = 190.0
BOUND_RATIO = 1.2


def ensure_format_split(workdir: Path, model: Path, n: int, entry: str) -> Path:
    """The split of a --formats entry (FMT or FMT@KERNEL: int4's layout follows the kernel; int8 has one)."""
    from tpi_mpi.weights.split import split

    fmt, _, kernel = entry.partition("@")
    dtype, spec = parse_weight_format(fmt)
    name = f"{model.name}-n{n}" if fmt == "fp32" else f"{model.name}-n{n}-{fmt}"  # fp32: bench.tp_latency's
    kernel = split_kernel(entry)
    if kernel and spec.format == "int4":
        name += f"-{kernel}"
    out = workdir / "shards" / name
    if not out.is_dir():  # split renames into place only when complete
        print(f"splitting {model} for N={n} as {entry} ...", file=sys.stderr, flush=True)
        split(model, out, n, dtype="auto" if dtype == "fp32" else dtype, quant_format=spec.format,
              group_size=spec.group_size, kernel=kernel or "auto")
    return out


def token_bytes(shards: Path, n: int) -> list[int]:
    """Per rank: weight bytes of one decoding step (every layer block, the rank's lm_head rows)."""
    from tpi_mpi.weights.tensorfile import parse_header

    out = []
    for r in range(n):
        d = shards / f"rank_{r}"
        blocks = sum(parse_header(p).data_bytes for p in d.glob("layer_*.safetensors"))
        head = parse_header(d / "head_slice.safetensors")
        out.append(blocks + sum(e.nbytes for k, e in head.entries.items() if k.startswith("lm_head.")))
    return out


def read_bandwidth(threads: int, gib: float = 2.0, repeats: int = 5, huge: bool = False) -> float:
    """Bytes/s of torch sum over a `gib` GiB fp32 tensor with `threads` threads (median of repeats); on transparent
    huge pages when `huge`, as the ranks hold their weights (tensorfile.weight_buffer)."""
    import torch

    from tpi_mpi.weights.tensorfile import weight_buffer

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    n = int(gib * 2**30) // 4
    x = weight_buffer(n * 4).view(torch.float32).fill_(1.0) if huge else torch.ones(n)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return x.numel() * 4 / statistics.median(times)


def read_bandwidths(threads: int) -> tuple[float, float]:
    """(on 4 KiB pages, on huge pages): the bound takes the higher, the harder test."""
    return read_bandwidth(threads), read_bandwidth(threads, huge=True)


def entry_kernel(entry: str) -> tuple[str, dict[str, str]]:
    """model.kernel and the extra environment of the runs of a --formats entry FMT or FMT@KERNEL (here and in
    bench.quality): @auto, @native, @torch set model.kernel; @avx2 runs our kernels with their AVX2 products where
    the CPU has AVX-512 VNNI (kernels/native.py)."""
    kernel = entry.partition("@")[2]
    if kernel not in ("", "auto", "native", "torch", "avx2"):
        raise UserError(f"--formats {entry}: the kernel after @ is one of auto, native, torch, avx2")
    if kernel == "avx2":
        return "native", {ISA_ENV: "avx2"}
    return kernel or "auto", {}


def split_kernel(entry: str) -> str:
    """The split's --kernel for a --formats entry, "" for auto: only @torch needs torch's int4 layout (@avx2 and
    @native read the rows layout, as auto does here)."""
    return "torch" if entry.partition("@")[2] == "torch" else ""


def split_format(fmt: str) -> str:
    """The weight format of a --formats entry (FMT or FMT@KERNEL)."""
    return fmt.partition("@")[0]


def family(fmt: str) -> str:
    return split_format(fmt).split("-")[0]


def main_decode(a: argparse.Namespace) -> int:
    workdir = Path(a.workdir)
    sizes = [int(x) for x in a.world_sizes.split(",")]
    fmts = a.formats.split(",")
    for f in fmts:
        parse_weight_format(split_format(f))
        entry_kernel(f)
    model = ensure_checkpoint(workdir, a.preset, a.layers)
    shards = {(n, f): ensure_format_split(workdir, model, n, f) for n in sizes for f in fmts}
    ids = prompt_ids(a.prompt_tokens)
    load0 = os.getloadavg()[0]
    bw_pages = read_bandwidths(cores())
    bw = max(bw_pages)
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {k: [] for k in shards}
    loads = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    jsonl = workdir / "formats.jsonl"
    order = [(n, f) for n in sizes for f in fmts]
    for rep in range(1, a.repeats + 1):
        for i, (n, f) in enumerate(order, 1):
            print(f"[repeat {rep}/{a.repeats}, {i}/{len(order)}] N={n} {f} ...", file=sys.stderr, flush=True)
            out = workdir / "runs" / f"{stamp}-formats-n{n}-{f}-r{rep}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            loads.append(os.getloadavg()[0])
            kernel, env = entry_kernel(f)
            rec = run_tpi(model, shards[(n, f)], n, ids, a.new_tokens, out, a.timeout, [f"model.kernel={kernel}"],
                          {**os.environ, **env} if env else None)
            runs[(n, f)].append(rec)
            with open(jsonl, "a") as fh:
                fh.write(json.dumps({"bench": "formats", "world_size": n, "format": f, "repeat": rep,
                                     "preset": a.preset, "layers": a.layers, "loadavg_1m_before": loads[-1],
                                     "read_bandwidth": bw, **{k: rec.get(k) for k in
                                                              ("ttft_s", "token_latency_s", "weights", "ranks")}})
                         + "\n")
    bw_pages_end = read_bandwidths(cores())
    bw_end = max(bw_pages_end)
    load1 = os.getloadavg()[0]
    rows = []
    for n, f in order:
        recs = runs[(n, f)]
        per_rank = token_bytes(shards[(n, f)], n)
        tok = statistics.median(r["token_latency_s"]["p50"] for r in recs) * 1e3
        ttft = statistics.median(r["ttft_s"] for r in recs) * 1e3
        bound = sum(per_rank) / min(bw, bw_end) * 1e3
        rows.append({"n": n, "format": f, "ttft_ms": ttft, "token_ms": tok, "mb_per_rank": max(per_rank) / 1e6,
                     "bound_ms": bound, "ratio": tok / bound,
                     "rss_mib": statistics.median(max(x["peak_rss_bytes"] for x in r["ranks"]) for r in recs) / 2**20})
    print(f"\n{a.preset} shapes, {a.layers} layers | {cores()} cores, threads per rank = cores / N | prompt "
          f"{a.prompt_tokens} tok, {a.new_tokens} new tok, greedy | median of {a.repeats} interleaved repeats | "
          f"read bandwidth (4 KiB / huge pages) {bw_pages[0] / 1e9:.1f} / {bw_pages[1] / 1e9:.1f} GB/s at start, "
          f"{bw_pages_end[0] / 1e9:.1f} / {bw_pages_end[1] / 1e9:.1f} at end (the bound's: the lower of start and end "
          f"of the higher, {min(bw, bw_end) / 1e9:.1f}) | "
          f"load average {load0:.2f} before, {statistics.median(loads):.2f} median at run starts, {load1:.2f} after")
    print("\n| N | weights | TTFT ms | token ms | MB/token/rank | bound ms | token / bound | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['format']} | {r['ttft_ms']:.0f} | {r['token_ms']:.1f} | {r['mb_per_rank']:.0f} | "
              f"{r['bound_ms']:.1f} | {r['ratio']:.2f} | {r['rss_mib']:.0f} |")
    print("\ntargets (issue 15):")
    for r in rows:
        fam = family(r["format"])
        checks = []
        if fam in ("fp16", "int8", "int4"):
            checks.append((f"token <= {BOUND_RATIO} x bound", r["ratio"] <= BOUND_RATIO, f"{r['ratio']:.2f}x"))
        if fam in TARGET_MS:
            checks.append((f"token <= {TARGET_MS[fam]:g} ms", r["token_ms"] <= TARGET_MS[fam], f"{r['token_ms']:.1f}"))
        if fam == "fp32":
            checks.append((f"TTFT <= {TTFT_FP32_MS:g} ms", r["ttft_ms"] <= TTFT_FP32_MS, f"{r['ttft_ms']:.0f}"))
        for what, ok, got in checks:
            print(f"  N={r['n']} {r['format']:9} {what:22} {'met' if ok else 'NOT met'} ({got})")
    by = {(r["n"], r["format"]): r for r in rows}
    for f in fmts:
        if family(f) == "int4" and (1, f) in by and (2, f) in by:
            t1, t2 = by[(1, f)]["token_ms"], by[(2, f)]["token_ms"]
            print(f"  {f}: N=2 faster than N=1 {'met' if t2 < t1 else 'NOT met'} ({t2:.1f} vs {t1:.1f} ms)")
    print(f"(per-run records: {jsonl})")
    return 0


def main_stream70b(a: argparse.Namespace) -> int:
    from tpi_mpi.bench import memory as mem
    from tpi_mpi.weights.split import split

    workdir = Path(a.workdir)
    n, layers = 8, a.layers
    fp16 = mem.ensure_split(workdir, layers, n)
    int4 = fp16.with_name(fp16.name + "-int4-g64")
    if not int4.is_dir():
        model = workdir / "models" / f"{mem.PRESET}-L{layers}-fp16"
        print(f"splitting {model} for N={n} as int4-g64 ...", file=sys.stderr, flush=True)
        split(model, int4, n, quant_format="int4", group_size=64, quiet=False)
    tmp = workdir / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((fp16 / "rank_1" / "config.json").read_text())
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_layer_bytes = 2 * max(1, cfg["num_key_value_heads"] // n) * hd * mem.KV_TOKENS * 2
    load0 = os.getloadavg()[0]
    got: dict[str, list[dict[str, Any]]] = {"fp16": [], "int4-g64": []}
    for rep in range(a.repeats):
        for label, shards in (("fp16", fp16), ("int4-g64", int4)):
            print(f"  [repeat {rep + 1}/{a.repeats}] {label} stream W=2 ...", file=sys.stderr, flush=True)
            block_bytes = max(sum(f.stat().st_size for f in (shards / f"rank_{r}").glob("layer_0000.*"))
                              for r in range(n))
            rec = mem.run(shards, n, ["memory=stream", "memory.window=2"], a.new_tokens, tmp)
            if isinstance(rec, str):
                raise SystemExit(f"{label} failed: {rec}")
            got[label].append(mem.summarise(rec, kv_layer_bytes, layers, block_bytes))
    load1 = os.getloadavg()[0]

    def med(label: str, key: str) -> float:
        return statistics.median(s[key] for s in got[label])

    print(f"\n{mem.PRESET} shapes, {layers} layers, N={n} on {cores()} cores, memory=stream W=2, page cache dropped "
          f"before each run, {a.new_tokens} new tokens (median of the later), median of {a.repeats} interleaved "
          f"repeats | load average {load0:.1f} -> {load1:.1f}")
    print("\n| weights | token s | / fp16 | read/token/rank MiB (max) | peak RSS max MiB | at 80 layers GiB |")
    print("|---|---|---|---|---|---|")
    for label in got:
        print(f"| {label} | {med(label, 'token_s'):.2f} | {med(label, 'token_s') / med('fp16', 'token_s'):.2f} | "
              f"{med(label, 'bytes_per_token_max') / 2**20:.0f} | {med(label, 'peak_rss') / 2**20:.0f} | "
              f"{med(label, 'mem_80') / 2**30:.2f} |")
    ratio = med("int4-g64", "token_s") / med("fp16", "token_s")
    print(f"\ntarget: int4 token latency <= 0.35 x fp16's: {'met' if ratio <= 0.35 else 'NOT met'} ({ratio:.2f}); "
          f"bytes {med('int4-g64', 'bytes_per_token_max') / med('fp16', 'bytes_per_token_max'):.2f}x")
    return 0


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.formats", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--formats", default="fp32,fp16,int8,int8@torch,int4-g32,int4-g64,int4-g64@torch,int4-g128")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="default bench_out/tp_latency (bench_out/memory with --stream70b)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--stream70b", action="store_true", help="the 70B-shaped streamed comparison instead")
    a = p.parse_args(argv)
    if a.stream70b:
        a.workdir = a.workdir or "bench_out/memory"
        a.new_tokens = a.new_tokens if "--new-tokens" in (argv or sys.argv) else 4
        return main_stream70b(a)
    a.workdir = a.workdir or "bench_out/tp_latency"
    return main_decode(a)


if __name__ == "__main__":
    sys.exit(main())
