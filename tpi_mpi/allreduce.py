"""Allreduce (sum, in place) of the partial outputs of row-parallel layers.

Every algorithm works on contiguous float32 numpy buffers through mpi4py's buffer interface (upper-case
methods: no pickling) and counts its calls, bytes and time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

_TAG = 17


@dataclass
class CommStats:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "seconds": self.seconds}


class Allreduce:
    """Sum `buf` over all ranks, in place; every rank ends with bitwise the same result."""

    name = "base"

    def __init__(self, comm: MPI.Comm):
        self.comm = comm
        self.stats = CommStats()

    def __call__(self, buf: np.ndarray) -> None:
        if not (buf.dtype == np.float32 and buf.flags.c_contiguous):
            raise TypeError("allreduce takes a contiguous float32 buffer")
        t0 = time.perf_counter()
        if self.comm.size > 1 and buf.size:
            self._reduce(buf)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0

    def _reduce(self, buf: np.ndarray) -> None:
        raise NotImplementedError


class StarAllreduce(Allreduce):
    """Workers send their partial sums to rank 0, which adds them and sends the sum back: two hops,
    whatever the number of ranks, which is what matters on latency-bound edge links."""

    name = "star"

    def __init__(self, comm: MPI.Comm):
        super().__init__(comm)
        self._scratch: np.ndarray | None = None

    def _reduce(self, buf: np.ndarray) -> None:
        comm, n, nbytes = self.comm, self.comm.size, buf.nbytes
        buf = buf.reshape(-1)  # a view: the buffer is contiguous
        if comm.rank != 0:
            comm.Send(buf, dest=0, tag=_TAG)
            comm.Recv(buf, source=0, tag=_TAG)
            self.stats.bytes_sent += nbytes
            self.stats.bytes_received += nbytes
            return
        if self._scratch is None or self._scratch.shape != (n - 1, buf.size):
            self._scratch = np.empty((n - 1, buf.size), dtype=np.float32)
        scratch = self._scratch
        recvs = [comm.Irecv(scratch[i], source=i + 1, tag=_TAG) for i in range(n - 1)]
        # Summed in rank order rather than arrival order, so that a run repeats bit for bit; the
        # later receives still proceed while the earlier partials are being added.
        for i, req in enumerate(recvs):
            req.Wait()
            buf += scratch[i]
        sends = [comm.Isend(buf, dest=r, tag=_TAG) for r in range(1, n)]
        MPI.Request.Waitall(sends)
        self.stats.bytes_received += nbytes * (n - 1)
        self.stats.bytes_sent += nbytes * (n - 1)


class MpiAllreduce(Allreduce):
    """MPI_Allreduce: the MPI library picks (or is told, through its own variables) the algorithm.

    Bytes are counted as the payload in each direction; what the library really moves depends on its
    algorithm (a ring moves 2(N-1)/N of it each way).
    """

    name = "mpi"

    def _reduce(self, buf: np.ndarray) -> None:
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self.stats.bytes_sent += buf.nbytes
        self.stats.bytes_received += buf.nbytes


ALGORITHMS: dict[str, type[Allreduce]] = {"star": StarAllreduce, "mpi": MpiAllreduce}


def make_allreduce(algo: str, comm: MPI.Comm) -> Allreduce:
    return ALGORITHMS[algo](comm)
