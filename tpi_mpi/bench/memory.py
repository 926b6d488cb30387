"""The memory scheduler on a Llama-2-70B-shaped model: memory per rank and token latency for windows
W = 1..4 against the fully resident run and against the disk bound, and latency against memory.budget.

    nice -n 10 python -m tpi_mpi.bench.memory [--layers 4] [--world-size 8] [--new-tokens 4]
        [--budget-points 5] [--workdir bench_out/memory] [--read-methods] [--disk-read 100MB]

Makes (once) a random-weight llama2-70b checkpoint with --layers layers, fp16, and its split for N
ranks in the workdir. Before every measurement the page cache is dropped (echo 3 > drop_caches; the
table says when that was not permitted), so every read is cold.

The disk bound: the bytes a token reads from disk (from the run records: bytes read after start-up per
forward pass, per rank) divided by the read bandwidth, measured cold in this same run (os.preadv into a
reused buffer, as the prefetcher reads) in two ways:
    per-device   one reader alone: the bound if every device had its own disk (the TPI-LLM setting):
                 max over ranks of bytes/token / single-reader bandwidth
    shared disk  N readers at once: all ranks of this machine share one disk: total bytes/token of all
                 ranks / aggregate bandwidth of N concurrent readers. On one machine this is the real bound.
Memory at 80 layers: the peak RSS of the largest rank (master included) plus what grows with layers when
streaming (the KV cache: 80 - layers more layers of it); when resident, every layer's blocks too.
The target of issue 3: token latency <= 1.2 x max(disk bound, resident latency) and <= 1.5 GB per device
at 80 layers.

Every run splits lm_head by vocabulary over the ranks (memory.head=split, the default) but two, which keep
it on the master (memory.head=master), resident and streamed with W=2, to compare the two.

--disk-read RATE gives every rank a disk of its own at RATE bytes/s, as on the paper's testbed: each rank
runs in an emulated device (python -m tpi_mpi.emulate run, device profile `paper` with that disk_read and
no memory cap, network `ethernet`), whose blkio/io cgroup throttles its reads of the shards' disk (root
needed). The bandwidths are then measured by readers in cgroups with the same throttle, one alone and N at
once (each in its own), so the aggregate shows whether the host's disk still keeps up with all N.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from tpi_mpi.errors import main_guard
from tpi_mpi.weights import tensorfile

PRESET = "llama2-70b"
FULL_LAYERS = 80
KV_TOKENS = 64
GiB, MiB = 2**30, 2**20


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def ensure_split(workdir: Path, layers: int, n: int) -> Path:
    from tpi_mpi.make_model import make_model
    from tpi_mpi.weights.split import split

    name = f"{PRESET}-L{layers}-fp16"
    shards = workdir / "shards" / f"{name}-n{n}"
    if shards.is_dir():  # split renames into place only when complete
        return shards
    model = workdir / "models" / name
    if not (model / "config.json").is_file():
        shutil.rmtree(model.with_name(model.name + ".partial"), ignore_errors=True)
        print(f"making {model} ...", file=sys.stderr, flush=True)
        make_model(model, PRESET, "llama", layers, seed=0, dtype="fp16", quiet=False)
    print(f"splitting for N={n} into {shards} ...", file=sys.stderr, flush=True)
    return split(model, shards, n, quiet=False)


def _read_dir(d: Path, buf: torch.Tensor) -> int:
    n = 0
    for f in sorted(d.glob("layer_*.safetensors")):
        tf = tensorfile.parse_header(f)
        _, got = tensorfile.load(tf, buf)
        n += got
    return n


def _largest(d: Path) -> int:
    return max(tensorfile.parse_header(f).data_bytes for f in d.glob("layer_*.safetensors"))


def read_bandwidth(shards: Path, n: int) -> dict[str, float]:
    """Cold read bandwidth (bytes/s) of one reader (rank 1's blocks) and of n readers at once (each its
    rank's blocks), read as the prefetcher reads."""
    dirs = [shards / f"rank_{r}" for r in range(n)]
    bufs = [torch.empty(_largest(d), dtype=torch.uint8) for d in dirs]
    drop_caches()
    t0 = time.perf_counter()
    single = _read_dir(dirs[min(1, n - 1)], bufs[0]) / (time.perf_counter() - t0)
    drop_caches()
    got = [0] * n

    def reader(r: int) -> None:
        got[r] = _read_dir(dirs[r], bufs[r])

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"single": single, "aggregate": sum(got) / (time.perf_counter() - t0)}


def _throttled_reader(d: str, session: str, rank: int, start: Any, out: Any) -> None:
    """In a process of its own: join rank's throttled cgroup, wait for every reader, read d's blocks."""
    from tpi_mpi.emulate import cgroups

    backend, _ = cgroups.detect()
    assert backend is not None
    cgroups.join(backend, session, rank)
    buf = torch.empty(_largest(Path(d)), dtype=torch.uint8)
    start.wait()  # a barrier: every reader has imported torch and allocated its buffer
    t0 = time.perf_counter()
    n = _read_dir(Path(d), buf)
    out.put((n, t0, time.perf_counter()))


def throttled_bandwidth(shards: Path, n: int, rate: int) -> dict[str, float]:
    """As read_bandwidth, each reader in a cgroup of its own that throttles reads of the shards' disk to
    `rate` (the emulator's device cgroups); the cgroups are removed afterwards, also on failure."""
    import multiprocessing as mp

    from tpi_mpi.emulate import cgroups
    from tpi_mpi.emulate.profiles import DeviceProfile

    backend, why = cgroups.detect()
    if backend is None:
        raise SystemExit(f"--disk-read needs a cgroup hierarchy: {why}")
    session = f"tpibench{os.getpid()}"
    device = DeviceProfile("bench", None, None, rate)
    ctx = mp.get_context("spawn")
    try:
        for r in range(n):
            notes = cgroups.create(backend, session, r, device, str(shards))
            if notes:
                raise SystemExit(f"--disk-read: {'; '.join(notes)}")
        result = {}
        for label, readers in (("single", [min(1, n - 1)]), ("aggregate", list(range(n)))):
            drop_caches()
            start, out = ctx.Barrier(len(readers)), ctx.Queue()
            procs = [ctx.Process(target=_throttled_reader, args=(str(shards / f"rank_{r}"), session, r, start, out))
                     for r in readers]
            for p in procs:
                p.start()
            got = [out.get(timeout=900) for _ in procs]
            for p in procs:
                p.join()
            result[label] = sum(g[0] for g in got) / (max(g[2] for g in got) - min(g[1] for g in got))
        return result
    finally:
        left = cgroups.destroy(backend, session)
        if left:
            print(f"could not remove cgroups: {left}", file=sys.stderr)


def read_methods(shards: Path, repeats: int = 5) -> None:
    """The comparison quoted in prefetch.py: one FFN block read cold five ways."""
    import mmap

    from safetensors.torch import load_file

    path = shards / "rank_1" / "layer_0000.ffn.safetensors"
    tf = tensorfile.parse_header(path)
    buf = torch.empty(tf.data_bytes, dtype=torch.uint8)

    def st() -> None:
        o = 0
        for v in load_file(str(path)).values():
            b = v.reshape(-1).view(torch.uint8)
            buf[o:o + b.numel()].copy_(b)
            o += b.numel()

    def mm() -> None:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
            buf.copy_(torch.frombuffer(m, dtype=torch.uint8)[tf.data_offset:])

    def readinto() -> None:
        with open(path, "rb", buffering=0) as f:
            f.seek(tf.data_offset)
            f.readinto(buf.numpy().data)

    methods = {"os.preadv into a reused buffer": lambda: tensorfile.load(tf, buf),
               "file.readinto into a reused buffer": readinto,
               "os.preadv into a fresh buffer": lambda: tensorfile.load(tf),
               "mmap + copy into a reused buffer": mm,
               "safetensors load_file (+ copy out)": st}
    print(f"\ncold read of {path.name} ({tf.data_bytes / MiB:.0f} MiB), median of {repeats}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| method | ms | GB/s |\n|---|---|---|")
    for name, fn in methods.items():
        times = []
        for _ in range(repeats):
            fd = os.open(path, os.O_RDONLY)
            tensorfile.drop_cache(fd)
            os.close(fd)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"| {name} | {t * 1e3:.0f} | {tf.data_bytes / t / 1e9:.2f} |")


def run(shards: Path, n: int, overrides: list[str], new_tokens: int, tmp: Path,
        disk_read: int | None = None) -> dict[str, Any] | str:
    """One generation under mpirun (through the emulator with --disk-read); its record, or the error line."""
    drop_caches()
    out = tmp / "r.json"
    out.unlink(missing_ok=True)
    launch = [str(Path(sys.executable).with_name("mpirun")), "-n", str(n), sys.executable, "-m", "tpi_mpi.run"]
    if disk_read is not None:
        launch = [sys.executable, "-m", "tpi_mpi.emulate", "run", "network=ethernet", "device=paper",
                  "device.memory=null", f"device.disk_read={disk_read}", f"devices={n}", f"disk_path={shards}",
                  "session=tpibench", "--"]
    cmd = [*launch, f"hydra.run.dir={tmp}/hydra", f"model.shards={shards}",
           f"prompt_ids={[3 + i * 37 for i in range(8)]}",
           f"generation.max_new_tokens={new_tokens}", "generation.stop_on_eos=false", "logging.quiet=true",
           f"memory.kv_cache_tokens={KV_TOKENS}", f"output.json={out}", "output.results=null", *overrides]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
        return errors[0] if errors else proc.stderr[-2000:]
    return json.loads(out.read_text())


def summarise(rec: dict[str, Any], kv_layer_bytes: int, layers: int, block_bytes: int) -> dict[str, Any]:
    ranks = rec["ranks"]
    per_token = [(r["bytes_read"] - r["bytes_read_load"]) / max(1, r["forward_passes"]) for r in ranks]
    peak = max(r["peak_rss_bytes"] for r in ranks)
    streaming = ranks[0]["memory"]["mode"] != "resident"
    # Streaming: only the KV cache grows with the layers; resident: every layer's blocks too.
    grow = kv_layer_bytes + (0 if streaming else block_bytes)
    return {
        "mode": ranks[0]["memory"]["mode"],
        "window": max(r["memory"]["window"] for r in ranks),
        "token_s": rec["token_latency_s"]["p50"],
        "peak_rss": peak, "peak_rss_master": ranks[0]["peak_rss_bytes"],
        "mem_80": peak + (FULL_LAYERS - layers) * grow,
        "bytes_per_token_max": max(per_token), "bytes_per_token_sum": sum(per_token),
        "disk_wait_per_token": max(r["disk_wait_s"] / max(1, r["forward_passes"]) for r in ranks),
        "token_ids": rec["token_ids"],
    }


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.memory", description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--budget-points", type=int, default=5)
    p.add_argument("--workdir", default="bench_out/memory")
    p.add_argument("--read-methods", action="store_true", help="also compare the ways to read a block")
    p.add_argument("--disk-read", default=None,
                   help="give every rank a disk of its own at this many bytes/s, e.g. 100MB (emulated, root)")
    a = p.parse_args(argv)
    from tpi_mpi.units import parse_size

    disk_read = None if a.disk_read is None else parse_size(a.disk_read, "--disk-read", "100MB")
    workdir = Path(a.workdir)
    n, layers = a.world_size, a.layers
    shards = ensure_split(workdir, layers, n)
    tmp = workdir / "runs"
    tmp.mkdir(parents=True, exist_ok=True)
    cold = drop_caches()
    if a.read_methods:
        read_methods(shards)
    load0 = os.getloadavg()[0]
    bw = read_bandwidth(shards, n) if disk_read is None else throttled_bandwidth(shards, n, disk_read)
    print(f"\ncold read bandwidth: one reader {bw['single'] / 1e9:.2f} GB/s, {n} readers at once "
          f"{bw['aggregate'] / 1e9:.2f} GB/s in all", file=sys.stderr, flush=True)

    cfg = json.loads((shards / "rank_1" / "config.json").read_text())
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = max(1, cfg["num_key_value_heads"] // n)
    kv_layer_bytes = 2 * kv_heads * hd * KV_TOKENS * 2
    block_bytes = max(sum(f.stat().st_size for f in (shards / f"rank_{r}").glob("layer_0000.*")) for r in range(n))

    rows: list[tuple[str, dict[str, Any]]] = []
    configs = [("resident", ["memory=resident"]),
               ("resident, lm_head on master", ["memory=resident", "memory.head=master"])] + [
        (f"stream W={w}", ["memory=stream", f"memory.window={w}"]) for w in range(1, 5)] + [
        ("stream W=2, lm_head on master", ["memory=stream", "memory.window=2", "memory.head=master"])]
    for label, over in configs:
        print(f"  {label} ...", file=sys.stderr, flush=True)
        rec = run(shards, n, over, a.new_tokens, tmp, disk_read)
        if isinstance(rec, str):
            print(f"  {label} failed: {rec}", file=sys.stderr)
            continue
        rows.append((label, summarise(rec, kv_layer_bytes, layers, block_bytes)))

    # The smallest workable budget, from the error a too small one gives; then up to all resident.
    probe = run(shards, n, ["memory=budget", "memory.budget=1MB"], a.new_tokens, tmp, disk_read)
    m = re.search(r"at least (\d+)", probe if isinstance(probe, str) else "")
    curve: list[tuple[int, dict[str, Any]]] = []
    if m and a.budget_points > 1:
        smallest = int(m.group(1)) + 16 * MiB  # the overhead, measured at each start, varies by a few MiB
        resident = next((s for lbl, s in rows if lbl == "resident"), None)
        top = int(resident["peak_rss"] * 1.15) if resident else smallest * 2
        budgets = [smallest + (top - smallest) * i // (a.budget_points - 1) for i in range(a.budget_points)]
        for b in budgets:
            print(f"  budget {b / GiB:.2f} GiB ...", file=sys.stderr, flush=True)
            rec = run(shards, n, ["memory=budget", f"memory.budget={b}"], a.new_tokens, tmp, disk_read)
            if isinstance(rec, str):
                print(f"  budget {b} failed: {rec}", file=sys.stderr)
                continue
            curve.append((b, summarise(rec, kv_layer_bytes, layers, block_bytes)))
    else:
        print(f"  budget probe did not report a smallest budget: {probe}", file=sys.stderr)
    load1 = os.getloadavg()[0]

    resident_s = next((s["token_s"] for lbl, s in rows if lbl == "resident"), float("nan"))
    ref = [s["token_ids"] for _, s in rows + curve]  # type: ignore[operator]
    same = all(t == ref[0] for t in ref)

    def bounds(s: dict[str, Any]) -> tuple[float, float]:
        return s["bytes_per_token_max"] / bw["single"], s["bytes_per_token_sum"] / bw["aggregate"]

    print(f"\n{PRESET} shapes, {layers} layers, fp16 on disk, N={n} on this machine, {a.new_tokens} new tokens "
          f"(median of the later tokens), KV cache {KV_TOKENS} positions; page cache dropped before each run: "
          f"{'yes' if cold else 'NO (not permitted)'}; load average {load0:.1f} -> {load1:.1f}; "
          f"cold read {bw['single'] / 1e9:.2f} GB/s one reader, {bw['aggregate'] / 1e9:.2f} GB/s {n} readers"
          f"{'' if disk_read is None else f' (each rank its own disk at {disk_read / 1e6:g} MB/s, emulated)'}; "
          f"tokens identical in every run: {same}\n")
    # The bound is the larger of the two disk bounds: each device's own reads, and what the host's one disk
    # can deliver to all of them at once (the larger unless every rank has its own throttled disk).
    print("| run | token s | / resident | disk bound s (per device / shared disk) | / max(disk bounds, resident) "
          "| read/token/rank MiB (max) | disk wait/token s | peak RSS max MiB (master) | at 80 layers GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, s in rows:
        dev, shared = bounds(s)
        bound = f"{dev:.2f} / {shared:.2f}" if s["bytes_per_token_max"] >= MiB else "—"
        print(f"| {label} | {s['token_s']:.2f} | {s['token_s'] / resident_s:.2f} | {bound} | "
              f"{s['token_s'] / max(dev, shared, resident_s):.2f} | {s['bytes_per_token_max'] / MiB:.0f} | "
              f"{s['disk_wait_per_token']:.2f} | {s['peak_rss'] / MiB:.0f} ({s['peak_rss_master'] / MiB:.0f}) | "
              f"{s['mem_80'] / GiB:.2f} |")
    if curve:
        print("\n| memory.budget GiB | plan (rank 0) | token s | / resident | read/token/rank MiB | "
              "peak RSS max MiB |\n|---|---|---|---|---|---|")
        for b, s in curve:
            plan = s["mode"] if s["mode"] == "resident" else f"{s['mode']} W={s['window']}"
            print(f"| {b / GiB:.2f} | {plan} | {s['token_s']:.2f} | "
                  f"{s['token_s'] / resident_s:.2f} | {s['bytes_per_token_max'] / MiB:.0f} | "
                  f"{s['peak_rss'] / MiB:.0f} |")
    with open(workdir / "results.jsonl", "a") as f:
        for label, s in rows:
            f.write(json.dumps({"run": label, **s, "bandwidth": bw, "layers": layers, "n": n,
                                "disk_read": disk_read}) + "\n")
        for b, s in curve:
            f.write(json.dumps({"run": f"budget={b}", **s, "bandwidth": bw, "layers": layers, "n": n}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
