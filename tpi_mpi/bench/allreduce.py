"""Latency of every allreduce algorithm on the message sizes of real models, in one run.

    python -m tpi_mpi.bench.allreduce [--world-sizes 2,3,4,5,6,7,8] [--hidden 4096,5120,8192]
        [--dtypes fp32,fp16] [--tokens 1] [--repeats 30] [--warmup 3] [--jsonl FILE] [--timeout 300]
        [--emulate SESSION | --software-links NETWORK]

On emulated links (docs/emulation.md): `--emulate SESSION` runs every rank through the per-rank wrapper of
a session brought up with `python -m tpi_mpi.emulate up ... session=SESSION` (real shaped links, MPICH on
the wire); `--software-links wifi` models the links of conf/network/wifi.yaml in software instead (our
algorithms only: MPI's own and star-bcast are not point-to-point, so they are left out). Every JSON line
says which (`links`: none, shaped or software).

For each world size N the driver starts `mpirun -n N` three times (each with a timeout): once for our
algorithms and MPI_Allreduce as MPICH chooses, and once each with MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM=ring
and =recursive_doubling for the rows mpi(ring) and mpi(rd) (MPICH reads the variable only at start-up).
A message is one token's hidden state (hidden x tokens floats); fp16/bf16 rows send half the bytes, int8
rows 0.28 x (blocks of 32 int8 + a float32 scale; MPI rows: fp32 only); an `auto` wire row is comm.algo=auto
with comm.dtype=auto (it picks the wire too; star at fp32 beside it for the ratio). Inside a run the
algorithms are interleaved call by call, after warm-up calls; each sample is one allreduce started right
after a barrier, timed as the slowest rank's time.

Table: median microseconds, and in brackets the ratio to `star` on the same row (below 1: faster); for
mpi(ring) and mpi(rd), to the star timed alongside them in their own mpirun.
    star-bcast  star whose way back is MPI_Bcast instead of point-to-point sends
    tree        our recursive doubling
    auto        comm.algo=auto; "auto picks" is its choice for that size, from its start-up probe
A second table gives the error of each wire against the exact (float64) sum, relative to the largest
magnitude of the sum, over all our algorithms and sizes (inputs: standard normal per rank), and for int8
the largest error as a fraction of its derived bound (tpi_mpi/comm/wire.py: half a step per block per
quantization), over every value: at most 1 if the bound holds.
One JSON line per (N, size, wire, algorithm) goes to --jsonl (default bench_out/allreduce.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tpi_mpi.errors import main_guard

MPICH_VARIANTS = {"ring": "mpi(ring)", "recursive_doubling": "mpi(rd)"}  # MPICH name -> row label
COLUMNS = ["star", "star-bcast", "ring", "mesh", "tree", "mpi", "mpi(ring)", "mpi(rd)", "auto"]


def worker(args: argparse.Namespace) -> None:
    """Under mpirun: time the algorithms, write JSON lines (rank 0). Imports here: the driver needs no MPI."""
    import numpy as np
    from mpi4py import MPI

    from tpi_mpi.comm.allreduce import (
        ALGORITHMS,
        WIRE_DTYPES,
        Allreduce,
        AutoAllreduce,
        MpiAllreduce,
        StarAllreduce,
        probe_link,
    )
    from tpi_mpi.comm.wire import WireFormat, int8_error_bound

    comm = MPI.COMM_WORLD
    n, rank = comm.size, comm.rank
    mpich = os.environ.get("MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM")
    links = None
    if args.software_links:
        from tpi_mpi.comm.links import SoftwareLinks
        from tpi_mpi.emulate.profiles import load_network

        links = SoftwareLinks(rank, n, load_network(args.software_links))
    link_mode = "software" if links else ("shaped" if os.environ.get("TPI_MPI_EMU_SESSION") else "none")
    link = probe_link(comm, p2p=StarAllreduce(comm, links=links).p2p)

    def algorithms(wire: str) -> dict[str, Allreduce]:
        if mpich:  # a run for one of MPICH's forced algorithms: MPI_Allreduce, and star to compare with
            return {"star": StarAllreduce(comm), MPICH_VARIANTS[mpich]: MpiAllreduce(comm)} if wire == "fp32" else {}
        if wire == "auto":  # comm.dtype=auto: only comm.algo=auto takes it
            return {"star": StarAllreduce(comm, "fp32", links), "auto": AutoAllreduce(comm, "auto", links, link=link)}
        algos: dict[str, Allreduce] = {"star": StarAllreduce(comm, wire, links)}
        if links is None:
            algos["star-bcast"] = StarAllreduce(comm, wire, bcast=True)
        for name in ("ring", "mesh", "tree"):
            algos[name] = ALGORITHMS[name](comm, wire, links)
        if wire == "fp32" and links is None:
            algos["mpi"] = MpiAllreduce(comm)
        algos["auto"] = AutoAllreduce(comm, wire, links, link=link)
        return algos

    rows = []
    for hidden in args.hidden:
        size = hidden * args.tokens
        inputs = np.random.default_rng(rank).standard_normal(size).astype(np.float32)
        buf = np.empty_like(inputs)
        for wire in args.dtypes:
            algos = algorithms(wire)
            samples: dict[str, list[float]] = {name: [] for name in algos}
            for rep in range(args.warmup + args.repeats):
                for name, ar in algos.items():  # interleaved, so that drifts in load hit all alike
                    buf[...] = inputs
                    comm.Barrier()
                    t0 = time.perf_counter()
                    ar(buf)
                    dt = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
                    if rep >= args.warmup:
                        samples[name].append(dt)
            for name, ar in algos.items():
                sent_as = "fp32" if wire == "auto" and name == "star" else wire
                if isinstance(ar, AutoAllreduce):
                    sent_as = ar.choose(size)[1]
                row = {"n": n, "hidden": hidden, "tokens": args.tokens, "wire": wire, "algo": name,
                       "bytes": WireFormat(sent_as).nbytes(size), "median_us": statistics.median(samples[name]) * 1e6,
                       "samples_us": [round(s * 1e6, 1) for s in samples[name]], "mpich_algorithm": mpich,
                       "links": link_mode, "network": args.software_links or os.environ.get("TPI_MPI_EMU_NETWORK")}
                if isinstance(ar, AutoAllreduce):
                    choice, chosen_wire, predicted = ar.choices[4 * size]
                    row.update(auto_choice=choice if wire != "auto" else f"{choice} {chosen_wire}",
                               auto_predicted_us=predicted * 1e6,
                               link={"alpha_s": link.alpha, "beta_s_per_byte": link.beta,
                                     "gamma_s_per_byte": link.gamma})
                rows.append(row)
    # Wire error: every wire dtype through each of our algorithms, against the float64 sum.
    if not mpich and not args.no_error_table:
        for hidden in args.hidden:
            size = hidden * args.tokens
            inputs_all = [np.random.default_rng(r).standard_normal(size).astype(np.float32) for r in range(n)]
            exact = np.sum(np.stack(inputs_all).astype(np.float64), axis=0)
            for wire in WIRE_DTYPES:
                for name in ("star", "ring", "mesh", "tree"):
                    buf = inputs_all[rank].copy()
                    ALGORITHMS[name](comm, wire)(buf)
                    diff = np.abs(buf - exact)
                    row = {"n": n, "hidden": hidden, "tokens": args.tokens, "wire": wire, "algo": name,
                           "kind": "error", "max_rel_error": float(np.max(diff) / np.max(np.abs(exact)))}
                    if wire == "int8":
                        row["max_error_over_bound"] = float(np.max(diff / int8_error_bound(name, inputs_all)))
                    rows.append(row)
    if rank == 0:
        with open(args.out, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def run_world(n: int, mpich: str | None, args: argparse.Namespace, timeout: float) -> list[dict]:
    mpirun = str(Path(sys.executable).with_name("mpirun"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        wrapper = ["-m", "tpi_mpi.emulate.rank", "--session", args.emulate, "--", sys.executable]
        wrapper = wrapper if args.emulate else []
        cmd = [mpirun, "-n", str(n), sys.executable, *wrapper, "-m", "tpi_mpi.bench.allreduce", "--worker",
               "--out", str(out), "--hidden", ",".join(map(str, args.hidden)), "--dtypes", ",".join(args.dtypes),
               "--tokens", str(args.tokens), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        if args.software_links:
            cmd += ["--software-links", args.software_links]
        if args.no_error_table:
            cmd += ["--no-error-table"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM", None)
        if mpich:
            env["MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM"] = mpich
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                               env=env, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"timed out after {timeout:.0f}s: {' '.join(cmd)}") from None
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
        return [json.loads(line) for line in out.read_text().splitlines()]


def table(rows: list[dict]) -> str:
    timed = [r for r in rows if r.get("kind") != "error"]
    keys = sorted({(r["n"], r["hidden"], r["wire"]) for r in timed}, key=lambda k: (k[0], k[1], k[2] != "fp32"))
    cols = [c for c in COLUMNS if any(r["algo"] == c for r in timed)]
    lines = ["| N | hidden | wire | KiB | " + " | ".join(cols) + " | fastest | auto picks |",
             "|---|---|---|---|" + "---|" * len(cols) + "---|---|"]
    for n, hidden, wire in keys:
        same = [r for r in timed if (r["n"], r["hidden"], r["wire"]) == (n, hidden, wire)]
        # Each MPICH variant is its own mpirun: its ratio is to the star measured in that same run.
        star = {r["mpich_algorithm"]: r["median_us"] for r in same if r["algo"] == "star"}
        cell = {r["algo"]: r for r in same if r["algo"] != "star" or r["mpich_algorithm"] is None}
        out = []
        for c in cols:
            if c in cell:
                us = cell[c]["median_us"]
                out.append(f"{us:.0f} ({us / star[cell[c]['mpich_algorithm']]:.2f})")
            else:
                out.append("—")
        fastest = min(cell, key=lambda c: cell[c]["median_us"])
        auto = cell.get("auto", {}).get("auto_choice", "—")
        lines.append(f"| {n} | {hidden} | {wire} | {cell['star']['bytes'] / 1024:.0f} | " + " | ".join(out)
                     + f" | {fastest} | {auto} |")
    errors = [r for r in rows if r.get("kind") == "error"]
    if errors:
        wires = sorted({r["wire"] for r in errors}, key=["fp32", "fp16", "bf16", "int8"].index)
        bounded = "int8" in wires
        lines += ["", "| N | " + " | ".join(f"max rel. error {w}" for w in wires)
                  + (" | int8 max error / bound (star, ring, mesh, tree) |" if bounded else " |"),
                  "|---|" + "---|" * (len(wires) + bounded)]
        for n in sorted({r["n"] for r in errors}):
            errs = [max(r["max_rel_error"] for r in errors if r["n"] == n and r["wire"] == w) for w in wires]
            line = f"| {n} | " + " | ".join(f"{e:.1e}" for e in errs) + " |"
            if bounded:
                per_algo = [max(r["max_error_over_bound"] for r in errors if r["n"] == n and r["wire"] == "int8"
                                and r["algo"] == a) for a in ("star", "ring", "mesh", "tree")]
                line += " " + ", ".join(f"{x:.2f}" for x in per_algo) + " |"
            lines.append(line)
    return "\n".join(lines)


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world-sizes", default="2,3,4,5,6,7,8")
    p.add_argument("--hidden", default="4096,5120,8192", help="hidden sizes: Llama-2 7B, 13B, 70B")
    p.add_argument("--dtypes", default="fp32,fp16,int8",
                   help="wire dtypes to time (fp32, fp16, bf16, int8; auto: comm.algo=auto picking the wire too)")
    p.add_argument("--tokens", type=int, default=1, help="tokens per message (1: decoding)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--jsonl", default="bench_out/allreduce.jsonl")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mpirun")
    p.add_argument("--no-mpich-variants", action="store_true", help="skip the mpi(ring) and mpi(rd) runs")
    p.add_argument("--emulate", metavar="SESSION", help="ranks on the shaped links of an emulation session (up)")
    p.add_argument("--software-links", metavar="NETWORK", help="links modelled in software (a conf/network profile)")
    p.add_argument("--no-error-table", action="store_true", help="skip the wire-dtype error table")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.hidden = [int(h) for h in str(args.hidden).split(",")]
    args.dtypes = str(args.dtypes).split(",")
    if args.emulate and args.software_links:
        p.error("--emulate and --software-links exclude each other")
    if args.worker:
        worker(args)
        return 0
    rows: list[dict] = []
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    for n in (int(x) for x in args.world_sizes.split(",")):
        for mpich in [None] + ([] if args.no_mpich_variants else list(MPICH_VARIANTS)):
            print(f"N={n} {MPICH_VARIANTS.get(mpich or '', 'ours + mpi')} ...", file=sys.stderr, flush=True)
            rows += run_world(n, mpich, args, args.timeout)
    Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(args.jsonl, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"links: {rows[0]['links'] if rows else 'none'} {rows[0].get('network') or '' if rows else ''} | "
          f"load avg before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")
    print(table(rows))
    print(f"\n{len(rows)} rows appended to {args.jsonl} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
