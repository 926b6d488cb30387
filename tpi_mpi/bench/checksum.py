"""What checking a shard file's checksum costs, next to loading it, measured side by side in one run.

    python -m tpi_mpi.bench.checksum [--mib 1024] [--repeats 5] [--dir DIR]

Writes one safetensors file of --mib MiB (one fp16 tensor, as a layer block of a large model would be),
then times, interleaved per repeat so that drifts in load hit all alike, with the file in the page cache:
    read            reading the file in 16 MiB chunks into one buffer, nothing else
    xxh3_128        the default check when a shard is opened (model.verify_checksums=xxh3)
    sha256          model.verify_checksums=sha256
    load_file       safetensors.torch.load_file and one copy of the tensor (the lazily mapped bytes
                    are read then): what loading the block costs anyway
Table: median ms, GB/s, and the ratio to load_file. Cold-cache reads are slower for every row alike
(see /work/shared/ENVIRONMENT.md: 0.5-2 GB/s from disk), which makes the checksum's share smaller.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tpi_mpi.errors import main_guard
from tpi_mpi.weights.split import file_digests


def read_only(path: Path) -> None:
    buf = bytearray(1 << 24)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def load_and_touch(path: Path) -> None:
    # load_file maps the file lazily: the bytes are read when the weights are first used. A copy reads
    # every byte once, as the first forward pass does.
    load_file(str(path))["w"].clone()


@main_guard
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.checksum", description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=1024, help="size of the file in MiB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write the file (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "block.safetensors"
        save_file({"w": torch.randn(args.mib * 2**19, dtype=torch.float16)}, str(path))
        cases: dict[str, Callable[[], object]] = {
            "read": lambda: read_only(path),
            "xxh3_128": lambda: file_digests(path, ("xxh3_128",)),
            "sha256": lambda: file_digests(path, ("sha256",)),
            "load_file": lambda: load_and_touch(path),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        for rep in range(args.repeats + 1):  # the first round warms the page cache and is dropped
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                if rep:
                    times[name].append(time.perf_counter() - t0)
            print(f"  repeat {rep}/{args.repeats}", flush=True)
        size = path.stat().st_size
    base = statistics.median(times["load_file"])
    print(f"\nfile {size / 2**20:.0f} MiB, page cache warm, medians of {args.repeats}\n")
    print("| what | median ms | GB/s | / load_file |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m * 1e3:.0f} | {size / m / 1e9:.2f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
