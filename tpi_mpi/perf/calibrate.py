"""Calibration: the link probe run under mpirun, alpha-beta fits of each allreduce, and `calibrate`."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tpi_mpi.comm.cost_model import LinkModel
from tpi_mpi.comm.wire import WIRE_DTYPES, measure_codecs
from tpi_mpi.perf.kernels import measure_formats
from tpi_mpi.perf.measure import (
    ALGOS,
    launcher,
    measure_compute,
    measure_disk,
    measure_disk_readers,
    measure_fixed_costs,
    measure_overheads,
    run_mpirun,
)
from tpi_mpi.perf.shapes import FP32


def probe_links_rank(hidden: int, repeats: int) -> None:
    """Under mpirun: time every allreduce algorithm on one and on 16 tokens' hidden states, and the
    broadcast and one point-to-point hop; rank 0 prints one JSON line of median seconds."""
    import numpy as np
    from mpi4py import MPI

    from tpi_mpi import engine  # noqa: F401  (what a rank imports: torch, transformers' Llama, ...)
    from tpi_mpi.comm.allreduce import make_allreduce

    comm = MPI.COMM_WORLD
    if comm.rank == 0:  # rank 0 also runs Hydra and the tokenizer
        import hydra  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401
    rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, root=0)
    result: dict[str, Any] = {"base_rss": rss, **_probe_stretch(comm)}
    for q in (1, 16):
        buf = np.ones(q * hidden, dtype=np.float32)
        for algo in ALGOS:
            ar = make_allreduce(algo, comm)
            times = []
            for _ in range(repeats):
                comm.Barrier()
                t0 = time.perf_counter()
                ar(buf)
                times.append(time.perf_counter() - t0)
            result.setdefault(algo, {})[str(buf.nbytes)] = float(np.median(times))
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Bcast(buf, root=0)
            times.append(time.perf_counter() - t0)
        result.setdefault("bcast", {})[str(buf.nbytes)] = float(np.median(times))
        times = []
        for _ in range(repeats):  # one hop, rank 0 -> 1, timed at the receiver after a barrier
            comm.Barrier()
            t0 = time.perf_counter()
            if comm.rank == 0:
                comm.Send(buf, dest=1)
            elif comm.rank == 1:
                comm.Recv(buf, source=0)
            times.append(time.perf_counter() - t0)
        result.setdefault("p2p", {})[str(buf.nbytes)] = float(np.median(comm.bcast(times, root=1)))
        times = []
        for _ in range(repeats):  # around all ranks, 0 -> 1 -> ... -> N-1 -> 0, as pipeline stages hand on
            comm.Barrier()
            t0 = time.perf_counter()
            if comm.rank == 0:
                comm.Send(buf, dest=1)
                comm.Recv(buf, source=comm.size - 1)
            else:
                comm.Recv(buf, source=comm.rank - 1)
                comm.Send(buf, dest=(comm.rank + 1) % comm.size)
            times.append(time.perf_counter() - t0)
        result.setdefault("relay", {})[str(buf.nbytes)] = float(np.median(comm.bcast(times, root=0)))
    if comm.rank == 0:
        print("PROBE " + json.dumps(result), flush=True)


def _probe_stretch(comm: Any, repeats: int = 5) -> dict[str, float]:
    """Seconds of the matrix-vector products of measure_compute (4 x 45 MB, one thread) while every rank runs
    them at once ("all": tensor parallelism) and while rank 0 runs them and the others wait in MPI ("wait":
    a pipeline stage; MPICH's waiting ranks poll). all: the slowest rank's median, as an allreduce waits."""
    import torch

    torch.set_num_threads(1)
    h, f = 2048, 5504
    ws = [torch.randn(f, h) for _ in range(4)]
    v = torch.randn(1, h)

    def products() -> float:
        t0 = time.perf_counter()
        for m in ws:
            torch.nn.functional.linear(v, m)
        return time.perf_counter() - t0

    products()  # warm-up
    every = []
    for _ in range(repeats):
        comm.Barrier()
        every.append(products())
    slowest = max(comm.allgather(sorted(every)[len(every) // 2]))
    alone = []
    for _ in range(repeats):
        comm.Barrier()
        if comm.rank == 0:
            alone.append(products())
        comm.Barrier()  # the others wait here, polling
    wait = comm.bcast(sorted(alone)[len(alone) // 2] if comm.rank == 0 else None, root=0)
    return {"products_bytes": float(4 * f * h * FP32), "products_all_s": slowest, "products_wait_s": wait}


def measure_kernels(cores: int) -> dict[str, Any]:
    """Every weight format's kernel with one thread (a rank of the sweeps) and with all cores (a device of its
    own), each beside the read bandwidth with as many threads: the calibration's `formats_*` entries."""
    print("calibrating weight formats' kernels ...", file=sys.stderr, flush=True)
    return {"formats_1_thread": measure_formats(1), "formats_all_cores": measure_formats(cores)}


def fit_link(points: dict[str, float], algo: str, n: int) -> LinkModel:
    """alpha and beta of the cost model from two message sizes (gamma folded into beta)."""
    from tpi_mpi.comm.cost_model import predict

    (m1, t1), (m2, t2) = sorted((int(k), v) for k, v in points.items())
    unit = LinkModel(1.0, 0.0)
    per_byte = LinkModel(0.0, 1.0)
    if algo in ("bcast", "p2p", "mpi"):  # one message per step, whatever N: alpha + m beta
        a_coef, b_coef = 1.0, float(n - 1 if algo == "bcast" else 1)
    elif algo == "relay":  # N hops one after another: N (alpha + m beta)
        a_coef, b_coef = float(n), float(n)
    else:
        a_coef, b_coef = predict(algo, n, 1, unit), predict(algo, n, 1, per_byte)
    beta = max(0.0, (t2 - t1) / ((m2 - m1) * b_coef))
    alpha = max(0.0, (t1 - beta * b_coef * m1) / a_coef)
    return LinkModel(alpha, beta)


def calibrate(mpirun: str | list[str], world_sizes: tuple[int, ...] = (2, 4, 8), hidden: int = 1024,
              repeats: int = 20, fixed_costs: bool = True, formats: bool = True) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    t0 = time.time()
    calib: dict[str, Any] = {"cores": cores, "loadavg_before": os.getloadavg()}
    calib["compute_all_cores"] = measure_compute(cores)
    calib["compute_1_thread"] = measure_compute(1)
    if formats:  # each weight format's kernel, and the read bandwidth beside them (perf/kernels.py)
        calib.update(measure_kernels(cores))
    calib["wire_codecs"] = {k: asdict(v) for k, v in measure_codecs(WIRE_DTYPES).items()}
    calib["disk_bw"], calib["disk_bw_warm"] = measure_disk()
    with tempfile.TemporaryDirectory(prefix="perfmodel-") as d:
        calib["overheads"] = measure_overheads(Path(d))
    calib["disk_bw_readers"] = {str(k): v for k, v in measure_disk_readers((1, *world_sizes)).items()}
    links: dict[str, dict[str, Any]] = {}
    stretch: dict[str, dict[str, float]] = {"all": {"1": 1.0}, "wait": {"1": 1.0}}
    for n in world_sizes:
        out = run_mpirun([*launcher(mpirun), "-n", str(n), sys.executable, "-m", "tpi_mpi.perf", "probe-links",
                          "--hidden", str(hidden), "--repeats", str(repeats)], 300)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if line is None:
            raise RuntimeError(f"link probe on {n} ranks failed:\n{out.stderr[-2000:]}")
        raw = json.loads(line[6:])
        rss = raw.pop("base_rss")
        calib["base_rss_master"], calib["base_rss"] = float(rss[0]), float(max(rss[1:]))
        # one process alone would take products_bytes / weight_bw (measure_compute, same products)
        alone = raw.pop("products_bytes") / calib["compute_1_thread"]["weight_bw"]
        stretch["all"][str(n)] = max(1.0, raw.pop("products_all_s") / alone)
        stretch["wait"][str(n)] = max(1.0, raw.pop("products_wait_s") / alone)
        links[str(n)] = {"raw_s": raw, **{k: asdict(fit_link(v, k, n)) for k, v in raw.items()}}
    calib["links"] = links
    calib["stretch"] = stretch
    if fixed_costs:
        with tempfile.TemporaryDirectory(prefix="perfmodel-fixed-") as d:
            calib["fixed_costs"] = measure_fixed_costs(mpirun, Path(d), (1, *world_sizes))
    calib["seconds"] = time.time() - t0
    calib["loadavg_after"] = os.getloadavg()
    return calib


