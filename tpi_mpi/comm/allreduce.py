"""Allreduce (sum, in place) of the partial outputs of row-parallel layers.

Every algorithm works on contiguous float32 numpy buffers through mpi4py's buffer interface (upper-case
methods: no pickling) and counts its calls, bytes and time. Every rank ends with bitwise the same result:
each element is summed by one fixed sequence of additions, the same on every rank.

On the wire the partials are fp32, or fp16/bf16 (`comm.dtype`: half the bytes). Sums are always taken in
fp32; whatever a rank keeps of a value that other ranks only see rounded (its own partial in mesh and
tree, the sum it computed in star and ring) it rounds the same way, so the ranks still agree bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from tpi_mpi.comm import cost_model
from tpi_mpi.comm.links import P2P, SoftwareLinks

_TAG = 17
log = logging.getLogger("tpi_mpi")


@dataclass
class CommStats:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "seconds": self.seconds}


class WireFormat:
    """How partial sums travel. fp16 and bf16 are held as uint16 bit patterns, so that MPI moves them as
    plain 16-bit words (MPI has no standard half-precision type)."""

    def __init__(self, name: str):
        if name not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {name!r}: choose one of {', '.join(WIRE_DTYPES)}")
        self.name = name
        self.itemsize = 4 if name == "fp32" else 2

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 -> wire array. For fp32 this is `x` itself, not a copy."""
        if self.name == "fp32":
            return x
        if self.name == "fp16":
            return x.astype(np.float16).view(np.uint16)
        # bf16: round to nearest even on the upper 16 bits of the float32 pattern; NaN stays NaN.
        u = x.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)

    def decode(self, w: np.ndarray, out: np.ndarray) -> None:
        """Wire array -> float32, into `out`."""
        if self.name == "fp32":
            if w is not out:
                out[...] = w
        elif self.name == "fp16":
            out[...] = w.view(np.float16)
        else:
            out.view(np.uint32)[...] = w.astype(np.uint32) << 16

    def to_fp32(self, w: np.ndarray) -> np.ndarray:
        """Wire array -> float32: `w` itself for fp32, else a new array."""
        if self.name == "fp32":
            return w
        out = np.empty(w.size, dtype=np.float32)
        self.decode(w, out)
        return out

    def empty(self, size: int) -> np.ndarray:
        return np.empty(size, dtype=np.float32 if self.name == "fp32" else np.uint16)

    def round(self, x: np.ndarray) -> np.ndarray:
        """Round `x` in place to what the wire carries, and return its wire form."""
        w = self.encode(x)
        self.decode(w, x)
        return w


WIRE_DTYPES = ("fp32", "fp16", "bf16")


class Allreduce:
    """Sum `buf` over all ranks, in place; every rank ends with bitwise the same result."""

    name = "base"

    def __init__(self, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None):
        self.comm = comm
        self.wire = WireFormat(wire)
        self.stats = CommStats()
        self.p2p = P2P(comm, links)  # every point-to-point message goes through here (links: modelled)

    def __call__(self, buf: np.ndarray) -> None:
        if not (buf.dtype == np.float32 and buf.flags.c_contiguous):
            raise TypeError("allreduce takes a contiguous float32 buffer")
        t0 = time.perf_counter()
        if self.comm.size > 1 and buf.size:
            self._reduce(buf.reshape(-1))  # a view: the buffer is contiguous
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0

    def _reduce(self, buf: np.ndarray) -> None:
        """Sum the flat, non-empty `buf` over more than one rank, in place."""
        raise NotImplementedError

    def _count(self, sent: int, received: int) -> None:
        self.stats.bytes_sent += sent
        self.stats.bytes_received += received


class StarAllreduce(Allreduce):
    """Workers send their partial sums to rank 0, which adds them and sends the sum back: two hops,
    whatever the number of ranks, which is what matters on latency-bound edge links.

    The way back is point-to-point sends (default) or MPI_Bcast (`bcast=True`); the allreduce benchmark
    measures both. Bytes are counted as point-to-point either way.
    """

    name = "star"

    def __init__(self, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None,
                 bcast: bool = False):
        if bcast and links is not None:
            raise ValueError("the software link model covers point-to-point messages, not MPI_Bcast")
        super().__init__(comm, wire, links)
        self.bcast = bcast

    def _reduce(self, buf: np.ndarray) -> None:
        comm, n, wire = self.comm, self.comm.size, self.wire
        nbytes = buf.size * wire.itemsize
        if comm.rank != 0:
            w = wire.encode(buf)
            self.p2p.send(w, 0, _TAG)
            if self.bcast:
                comm.Bcast(w, root=0)
            else:
                self.p2p.recv(w, 0, _TAG)
            wire.decode(w, buf)
            self._count(nbytes, nbytes)
            return
        scratch = [wire.empty(buf.size) for _ in range(n - 1)]
        recvs = [self.p2p.irecv(scratch[i], i + 1, _TAG) for i in range(n - 1)]
        # Summed in rank order rather than arrival order, so that a run repeats bit for bit; the
        # later receives still proceed while the earlier partials are being added.
        for i, req in enumerate(recvs):
            req.Wait()
            buf += wire.to_fp32(scratch[i])
        w = wire.round(buf)  # rank 0 keeps exactly what the workers get
        if self.bcast:
            comm.Bcast(w, root=0)
        else:
            self.p2p.waitall([req for r in range(1, n) for req in self.p2p.isend(w, r, _TAG)])
        self._count(nbytes * (n - 1), nbytes * (n - 1))


def chunk_bounds(size: int, n: int) -> list[int]:
    """n+1 offsets cutting `size` elements into n chunks whose sizes differ by at most one."""
    return [i * size // n for i in range(n + 1)]


class RingAllreduce(Allreduce):
    """Reduce-scatter then all-gather around the ring rank -> rank+1: 2(N-1) steps, each moving 1/N of
    the buffer, so each rank sends about 2(N-1)/N of it whatever N (bandwidth-optimal).

    Chunk c is summed along the ring starting at rank c and ending at rank c-1, which then owns it: one
    fixed order of additions, and the all-gather only copies, so all ranks hold the same bits.
    """

    name = "ring"

    def _reduce(self, buf: np.ndarray) -> None:
        n, r, wire = self.comm.size, self.comm.rank, self.wire
        right, left = (r + 1) % n, (r - 1) % n
        bounds = chunk_bounds(buf.size, n)

        def chunk(c: int) -> np.ndarray:
            c %= n
            return buf[bounds[c]:bounds[c + 1]]

        recv = wire.empty(-(-buf.size // n))  # the largest chunk
        sent = received = 0
        # Reduce-scatter: at step s, send the running sum of chunk r-s, receive and add chunk r-s-1.
        for s in range(n - 1):
            out, into = chunk(r - s), chunk(r - s - 1)
            w, rw = wire.encode(out), recv[:into.size]
            self.p2p.sendrecv(w, right, rw, left, _TAG)
            into += wire.to_fp32(rw)
            sent, received = sent + w.nbytes, received + rw.nbytes
        own = chunk(r + 1)  # fully summed here
        wire.round(own)  # keep exactly what the others will get
        # All-gather: at step s, pass on chunk r+1-s, receive the finished chunk r-s.
        for s in range(n - 1):
            out, into = chunk(r + 1 - s), chunk(r - s)
            w, rw = wire.encode(out), recv[:into.size]
            self.p2p.sendrecv(w, right, rw, left, _TAG)
            wire.decode(rw, into)
            sent, received = sent + w.nbytes, received + rw.nbytes
        self._count(sent, received)


class MeshAllreduce(Allreduce):
    """One round: every rank sends its partial to every other rank and adds all N partials itself.

    The least latency (one message time) at N-1 times the bytes per rank. Every rank adds the partials
    in rank order 0..N-1 (its own, rounded to the wire format, in its place), so all agree bitwise.
    """

    name = "mesh"

    def _reduce(self, buf: np.ndarray) -> None:
        n, r, wire = self.comm.size, self.comm.rank, self.wire
        own = wire.round(buf)
        parts = [own if i == r else wire.empty(buf.size) for i in range(n)]
        reqs = [self.p2p.irecv(parts[i], i, _TAG) for i in range(n) if i != r]
        reqs += [req for i in range(n) if i != r for req in self.p2p.isend(own, i, _TAG)]
        self.p2p.waitall(reqs)
        total = wire.to_fp32(parts[0]).copy()
        for i in range(1, n):
            total += wire.to_fp32(parts[i])
        buf[...] = total
        self._count(own.nbytes * (n - 1), own.nbytes * (n - 1))


class RecursiveDoublingAllreduce(Allreduce):
    """`tree`: recursive doubling. In round k rank r swaps its running sum with rank r XOR 2^k and both
    add the two: log2 N rounds of the whole buffer. With N not a power of two, each rank p2+i beyond the
    largest power of two p2 first hands its partial to rank i and gets the result back at the end.

    Both ranks of a pair add the same two (wire-rounded) values, and a + b == b + a in IEEE arithmetic,
    so all ranks agree bitwise.
    """

    name = "tree"

    def _reduce(self, buf: np.ndarray) -> None:
        n, r, wire = self.comm.size, self.comm.rank, self.wire
        p2 = 1 << (n.bit_length() - 1)
        recv = wire.empty(buf.size)
        sent = received = 0
        if r >= p2:  # an extra rank: fold into rank r - p2, get the sum back
            w = wire.encode(buf)
            self.p2p.send(w, r - p2, _TAG)
            self.p2p.recv(recv, r - p2, _TAG)
            wire.decode(recv, buf)
            self._count(w.nbytes, recv.nbytes)
            return
        if r + p2 < n:
            self.p2p.recv(recv, r + p2, _TAG)
            buf += wire.to_fp32(recv)
            received += recv.nbytes
        mask = 1
        while mask < p2:
            partner = r ^ mask
            w = wire.round(buf)  # both ranks of the pair must add the same two values
            self.p2p.sendrecv(w, partner, recv, partner, _TAG)
            buf += wire.to_fp32(recv)
            sent, received, mask = sent + w.nbytes, received + recv.nbytes, mask * 2
        w = wire.round(buf)
        if r + p2 < n:
            self.p2p.send(w, r + p2, _TAG)
            sent += w.nbytes
        self._count(sent, received)


class MpiAllreduce(Allreduce):
    """MPI_Allreduce: the MPI library picks (or is told, through its own variables) the algorithm.
    fp32 on the wire only: a half-precision sum inside MPI would not be the fp32 sum of the others.

    Bytes are counted as the payload in each direction; what the library really moves depends on its
    algorithm (a ring moves 2(N-1)/N of it each way).
    """

    name = "mpi"

    def __init__(self, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None):
        if wire != "fp32":
            raise ValueError("comm.algo=mpi sends fp32 only: set comm.dtype=fp32")
        if links is not None:
            raise ValueError("the software link model cannot see inside MPI_Allreduce: use another comm.algo")
        super().__init__(comm, wire)

    def _reduce(self, buf: np.ndarray) -> None:
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        self._count(buf.nbytes, buf.nbytes)


def probe_link(comm: MPI.Comm, small: int = 8, large: int = 1 << 18, repeats: int = 10,
               p2p: P2P | None = None) -> cost_model.LinkModel:
    """Ping-pong between rank 0 and each other rank at two sizes: alpha from the small message, beta from
    the difference; gamma from timing a local add. The slowest link counts. Collective; every rank gets
    rank 0's figures, so that all of them choose the same algorithms. Through `p2p` (the software link
    model, if any), so that it measures the links the algorithms will see."""
    p2p = p2p or P2P(comm)
    a = np.zeros(large // 4, dtype=np.float32)
    alpha = beta = 0.0
    for peer in range(1, comm.size):
        if comm.rank not in (0, peer):
            continue
        times = {}
        for nbytes in (small, large):
            msg = a[:max(1, nbytes // 4)]
            samples = []
            for _ in range(repeats + 2):  # the first two warm the path up
                t0 = time.perf_counter()
                if comm.rank == 0:
                    p2p.send(msg, peer, _TAG)
                    p2p.recv(msg, peer, _TAG)
                else:
                    p2p.recv(msg, 0, _TAG)
                    p2p.send(msg, 0, _TAG)
                samples.append((time.perf_counter() - t0) / 2)
            times[nbytes] = float(np.median(samples[2:]))
        alpha = max(alpha, times[small])
        beta = max(beta, max(0.0, times[large] - times[small]) / (large - small))
    b = np.ones_like(a)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a += b
    gamma = (time.perf_counter() - t0) / repeats / a.nbytes
    link = comm.bcast(cost_model.LinkModel(alpha, beta, gamma) if comm.rank == 0 else None, root=0)
    assert isinstance(link, cost_model.LinkModel)
    return link


class AutoAllreduce(Allreduce):
    """`auto`: probes the links once at start-up, then for each message size uses the algorithm the
    alpha-beta model (cost_model.py) predicts to be fastest. Every rank holds rank 0's link figures, so
    every rank picks the same algorithm for the same size. Choices are logged on rank 0 and kept in
    `choices` (bytes on the wire -> algorithm, predicted seconds)."""

    name = "auto"

    def __init__(self, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None,
                 link: cost_model.LinkModel | None = None):
        super().__init__(comm, wire, links)
        self.link = link if link is not None else probe_link(comm, p2p=self.p2p)
        self.algorithms: dict[str, Allreduce] = {}
        for algo in cost_model.CANDIDATES:
            impl = ALGORITHMS[algo](comm, wire, links)
            impl.stats = self.stats  # one set of counters for the whole run
            self.algorithms[algo] = impl
        self.choices: dict[int, tuple[str, float]] = {}
        if comm.rank == 0:
            log.info("allreduce auto: link alpha %.1f us, beta %.3f ns/B (%.2f GB/s), gamma %.3f ns/B",
                     self.link.alpha * 1e6, self.link.beta * 1e9,
                     1e-9 / self.link.beta if self.link.beta else float("inf"), self.link.gamma * 1e9)

    def choose(self, nbytes: int) -> str:
        if nbytes not in self.choices:
            best, predictions = cost_model.choose(self.comm.size, nbytes, self.link)
            self.choices[nbytes] = (best, predictions[best])
            if self.comm.rank == 0:
                log.info("allreduce auto: %d B on %d ranks -> %s (predicted %s)", nbytes, self.comm.size, best,
                         ", ".join(f"{a} {t * 1e6:.0f} us" for a, t in predictions.items()))
        return self.choices[nbytes][0]

    def _reduce(self, buf: np.ndarray) -> None:
        self.algorithms[self.choose(buf.size * self.wire.itemsize)]._reduce(buf)


ALGORITHMS: dict[str, type[Allreduce]] = {
    "star": StarAllreduce,
    "ring": RingAllreduce,
    "mesh": MeshAllreduce,
    "tree": RecursiveDoublingAllreduce,
    "mpi": MpiAllreduce,
    "auto": AutoAllreduce,
}


def make_allreduce(algo: str, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None) -> Allreduce:
    return ALGORITHMS[algo](comm, wire, links)
