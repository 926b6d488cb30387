"""What the emulator really gives: one-way latency (fastest of 30 round trips / 2) and bandwidth
of each link from rank 0 (MPI ping-pong through the shaped links, or through the software model), and the
memory cap and CPU quota each rank sees from inside, next to the profile.

Bandwidth comes from two large messages, L and 2L bytes: L / (t(2L) - t(L)). Both start with the same
full token bucket and pay the same latency, so neither the tbf burst nor the latency biases it.

The worker runs under mpirun (through the per-rank wrapper for shaped links). Ranks not being measured
wait by sleeping, not in a spinning MPI call: on a small host their polling would delay the measured pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tpi_mpi.errors import main_guard

_TAG = 31


def _idle_wait(req: Any, pause: float = 0.002) -> None:
    while not req.Test():
        time.sleep(pause)


def _polite_wait(req: Any) -> None:
    """Wait for a receive without spinning: MPICH's blocking calls busy-poll, and on an oversubscribed
    host a spinning rank is often not on a core when its message arrives (measured: +5 ms per message
    at load 9 on 2 cores) -- the latency of the CPU queue, not of the link."""
    from mpi4py import MPI

    if isinstance(req, MPI.Request):
        _idle_wait(req, 20e-6)
    else:
        req.Wait()  # the software model's receive: it sleeps until the modelled delivery itself


def _cpu_quota() -> float | None:
    from tpi_mpi.emulate import cgroups

    backend, _ = cgroups.detect()
    if backend is None:
        return None
    key = "cpu" if backend.version == 1 else ""
    if key not in backend.dirs:
        return None
    d = backend.dirs[key] / cgroups.current().get(key, "/").lstrip("/")
    try:
        if backend.version == 1:
            quota, period = int((d / "cpu.cfs_quota_us").read_text()), int((d / "cpu.cfs_period_us").read_text())
        else:
            q, p = (d / "cpu.max").read_text().split()
            if q == "max":
                return None
            quota, period = int(q), int(p)
    except (OSError, ValueError):
        return None
    return None if quota <= 0 else quota / period


def worker(args: argparse.Namespace) -> None:
    import numpy as np
    from mpi4py import MPI

    from tpi_mpi.comm.links import P2P, SoftwareLinks
    from tpi_mpi.emulate import cgroups
    from tpi_mpi.emulate.profiles import load_network

    comm = MPI.COMM_WORLD
    try:  # sleeps of 20 us, not the default 50 us of timer slack on top
        import ctypes

        ctypes.CDLL(None).prctl(29, 1000)  # PR_SET_TIMERSLACK, in ns
    except (OSError, AttributeError):
        pass
    links = None
    if args.software:
        links = SoftwareLinks(comm.rank, comm.size, load_network(args.software, json.loads(args.overrides)))
    p2p = P2P(comm, links)
    large_bytes = [int(x) for x in args.large_bytes.split(",")]
    rows = []
    for peer in range(1, comm.size):
        go = np.zeros(1, dtype=np.int32)
        if comm.rank == peer:
            _idle_wait(comm.Irecv(go, source=0, tag=_TAG + 1))
        elif comm.rank == 0:
            comm.Send(go, dest=peer, tag=_TAG + 1)
        if comm.rank in (0, peer):
            times: dict[int, float] = {}
            medians: dict[int, float] = {}
            small = np.zeros(2, dtype=np.float32)
            one = np.zeros(large_bytes[peer] // 4, dtype=np.float32)
            two = np.zeros(2 * one.size, dtype=np.float32)
            for msg, reps in ((small, args.repeats), (one, args.large_repeats), (two, args.large_repeats)):
                samples = []
                for i in range(reps + 2):  # two to warm up the connection (TCP window, daemon)
                    t0 = time.perf_counter()
                    if comm.rank == 0:
                        p2p.waitall(p2p.isend(msg, peer, _TAG))
                        _polite_wait(p2p.irecv(msg, peer, _TAG))
                    else:
                        _polite_wait(p2p.irecv(msg, 0, _TAG))
                        p2p.waitall(p2p.isend(msg, 0, _TAG))
                    if i >= 2:
                        samples.append((time.perf_counter() - t0) / 2)
                # The fastest round trip: the link never delivers early, and a busy host only adds to it (a rank
                # that is not on a core when its message arrives waits for one, up to a scheduler tick); the
                # median, which includes that wait, is reported next to it.
                times[msg.nbytes] = min(samples)
                medians[msg.nbytes] = statistics.median(samples)
            if comm.rank == 0:
                rows.append({"src": 0, "dst": peer, "latency_s": times[small.nbytes],
                             "latency_median_s": medians[small.nbytes], "large_bytes": [one.nbytes, two.nbytes],
                             "large_one_way_s": [times[one.nbytes], times[two.nbytes]],
                             "bandwidth_bit_s": one.nbytes * 8 / max(1e-9, times[two.nbytes] - times[one.nbytes])})
    _idle_wait(comm.Ibarrier())
    me = {"rank": comm.rank, "memory_limit_bytes": cgroups.memory_limit_of(), "cpus": _cpu_quota()}
    ranks = comm.gather(me, root=0)
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps({"links": rows, "ranks": ranks}))


def table(measured: dict[str, Any], expected_links: list[dict[str, float]], devices: list[dict[str, Any]],
          tolerance: float) -> tuple[str, bool]:
    """The measured figures next to the profile's; ok is False when a link is off by more than `tolerance`."""
    from tpi_mpi.emulate.profiles import human_bytes

    ok = True
    lines = [f"{'link':>6} | {'latency profile':>15} | {'measured':>9} | {'error':>6} | {'median':>9} | "
             f"{'bandwidth profile':>17} | {'measured':>12} | {'error':>6}"]
    for row in measured["links"]:
        exp = expected_links[row["dst"]]
        lat_err = row["latency_s"] / exp["latency_s"] - 1 if exp["latency_s"] else float("nan")
        bw_err = row["bandwidth_bit_s"] / exp["bandwidth_bit_s"] - 1
        ok = ok and abs(bw_err) <= tolerance and (not exp["latency_s"] or abs(lat_err) <= tolerance)
        lines.append(f"{'0->' + str(row['dst']):>6} | {exp['latency_s'] * 1e3:>12.3f} ms | "
                     f"{row['latency_s'] * 1e3:>6.3f} ms | {lat_err:>+6.1%} | "
                     f"{row['latency_median_s'] * 1e3:>6.3f} ms | "
                     f"{exp['bandwidth_bit_s'] / 1e6:>11.1f} Mbit/s | {row['bandwidth_bit_s'] / 1e6:>5.1f} Mbit/s | "
                     f"{bw_err:>+6.1%}")
    lines += ["", f"{'rank':>4} | {'device':>16} | {'memory cap profile':>18} | {'cap seen by rank':>16} | "
                  f"{'CPU profile':>11} | {'CPU quota seen':>14}"]
    for r in measured["ranks"]:
        dev = devices[r["rank"]]
        cpus, seen = dev.get("cpus"), r.get("cpus")
        lines.append(f"{r['rank']:>4} | {dev['name']:>16} | {human_bytes(dev.get('memory_bytes')):>18} | "
                     f"{human_bytes(r['memory_limit_bytes']):>16} | "
                     f"{'uncapped' if cpus is None else f'{cpus:g}':>11} | "
                     f"{'uncapped' if seen is None else f'{seen:g}':>14}")
        ok = ok and r["memory_limit_bytes"] == dev.get("memory_bytes")
    return "\n".join(lines), ok


def large_message_bytes(bandwidth_bit_s: float, seconds: float = 0.08) -> int:
    """L: a message that takes about `seconds` at the link's rate (between 64 KiB and 64 MiB): long enough
    to time well, short enough for a quick check."""
    return int(min(64 * 2**20, max(64 * 2**10, bandwidth_bit_s / 8 * seconds))) // 4 * 4


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--large-bytes", required=True, help="per rank, comma-separated")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--large-repeats", type=int, default=4)
    p.add_argument("--software", default=None, help="network profile for the software link model")
    p.add_argument("--overrides", default="{}")
    worker(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
