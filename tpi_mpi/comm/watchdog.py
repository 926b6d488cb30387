"""Stops a job whose collective stalls (a rank stopped, hung, or its link cut), naming what and who.

The inference loop marks each collective it enters (`with watchdog("allreduce", layer, "ffn"): ...`): one
tuple assignment, so the loop does not slow down. A thread per rank wakes every timeout/10 (at most 1 s)
and, when the marked operation has run longer than comm.timeout_s:
  - a worker sends rank 0 a report (which operation it is stuck in) over a communicator of the
    watchdog's own, then waits for rank 0 to stop the job;
  - rank 0 collects the reports for a grace period, prints one line naming its operation and the ranks
    that did not report being in it (stopped, hung, or cut off), and aborts every rank.
If rank 0 itself does not answer, each worker stops the job on its own after the grace period.
MPI is initialised with MPI_THREAD_MULTIPLE (mpi4py's default), so the thread may call MPI while the
main thread is blocked in a collective.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from mpi4py import MPI

from tpi_mpi.errors import abort

_TAG = 23


class Op(NamedTuple):
    seq: int  # the same on every rank for the same operation: every rank runs the same sequence
    number: int  # how many operations of this kind so far (the "#1234" in the message)
    started: float
    kind: str
    layer: int | None
    part: str | None

    def describe(self) -> str:
        where = f" of layer {self.layer} ({self.part})" if self.layer is not None else ""
        return f"{self.kind} #{self.number}{where}"


class Watchdog:
    """`timeout_s` None or 0, or one rank: no thread runs, operations are only counted."""

    def __init__(self, comm: MPI.Comm | None, timeout_s: float | None, grace_s: float | None = None):
        self.timeout_s = timeout_s or 0.0
        self.grace_s = grace_s if grace_s is not None else min(5.0, self.timeout_s / 2)
        self.seq = 0
        self.counts: dict[str, int] = {}
        self.current: Op | None = None
        self._pending: Op | None = None
        self._sent: MPI.Request | None = None  # a worker's report to rank 0, kept alive while in flight
        self._thread: threading.Thread | None = None
        if comm is None or not self.timeout_s or comm.size == 1:
            return
        self.world = comm
        self.comm = comm.Dup()  # reports never mix with the model's messages
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tpi_mpi-watchdog", daemon=True)
        self._thread.start()

    def __call__(self, kind: str, layer: int | None = None, part: str | None = None,
                 watch: bool = True) -> Watchdog:
        """Mark the next operation; use as `with watchdog(kind, ...):`. watch=False only counts it."""
        self.seq += 1
        number = self.counts[kind] = self.counts.get(kind, 0) + 1
        self._pending = Op(self.seq, number, time.monotonic(), kind, layer, part) if watch else None
        return self

    def __enter__(self) -> None:
        self.current = self._pending

    def __exit__(self, *exc: object) -> None:
        self.current = None

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.comm.Free()

    def _run(self) -> None:
        poll = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(poll):
            op = self.current
            if op is not None and time.monotonic() - op.started > self.timeout_s:
                if self.world.rank == 0:
                    self._stop_job(op)
                else:
                    self._report(op)

    def _report(self, op: Op) -> None:
        """A worker: tell rank 0 where it is stuck, then wait for rank 0 to stop the job."""
        # Nonblocking: with rank 0 stopped or its link cut, even a small send might not complete.
        self._sent = self.comm.isend((op.seq, op.describe()), dest=0, tag=_TAG)
        # Rank 0 waits up to grace_s for the reports; then one more second, staggered so that the lowest
        # rank speaks first if rank 0 is silent (its MPI_Abort takes the others down).
        deadline = time.monotonic() + self.grace_s + 1.0 + 0.2 * self.world.rank
        while time.monotonic() < deadline:
            if self._stop.wait(0.05) or self.current is not op:
                return  # it completed after all (slow, not stalled), or the job is ending
        abort(self.world, f"watchdog on rank {self.world.rank}: {op.describe()} did not complete within "
                          f"comm.timeout_s={self.timeout_s:g} s and rank 0 did not answer: rank 0 is stopped, "
                          "hung or cut off", 3)

    def _stop_job(self, op: Op) -> None:
        """Rank 0: collect the workers' reports, name the ranks that did not arrive, abort every rank."""
        where: dict[int, tuple[int, str]] = {}
        deadline = time.monotonic() + self.grace_s
        status = MPI.Status()
        while time.monotonic() < deadline:
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                where[status.source] = self.comm.recv(source=status.source, tag=_TAG)  # latest counts
            elif all(where.get(r, (0, ""))[0] >= op.seq for r in range(1, self.world.size)):
                break
            else:
                time.sleep(0.01)
        # A rank stuck in a later operation arrived at this one and went on: its part of a gather is sent
        # without waiting for rank 0 to receive it, so it can be waiting for the next header already.
        missing = [r for r in range(1, self.world.size) if where.get(r, (0, ""))[0] < op.seq]
        elsewhere = "".join(f"; rank {r} is stuck in {where[r][1]}" for r in missing if r in where)
        who = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} did not arrive "
               f"(stopped, hung or cut off){elsewhere}" if missing
               else "every rank arrived: a message between them is stuck (link cut?)")
        abort(self.world, f"watchdog: {op.describe()} did not complete within comm.timeout_s="
                          f"{self.timeout_s:g} s; {who}", 3)
