"""Allreduce (sum, in place) of the partial outputs of row-parallel layers.

Every algorithm works on contiguous float32 numpy buffers through mpi4py's buffer interface (upper-case
methods: no pickling) and counts its calls, bytes and time. Every rank ends with bitwise the same result:
each element is summed by one fixed sequence of additions, the same on every rank.

On the wire the partials are fp32, fp16/bf16 (`comm.dtype`: half the bytes) or int8 blocks with a scale
each (0.28 x the bytes; wire.py has the formats and the int8 error bound). Sums are always taken in fp32;
whatever a rank keeps of a value that other ranks only see rounded (its own partial in mesh and tree, the
sum it computed in star and ring) it rounds the same way, and what a rank passes on unchanged (ring's
all-gather) it forwards as the bytes it received, so the ranks still agree bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from tpi_mpi.comm import cost_model
from tpi_mpi.comm.links import P2P, SoftwareLinks
from tpi_mpi.comm.wire import AUTO_WIRES, INT8_BLOCK, WIRE_CHOICES, WIRE_DTYPES, WireFormat, measure_codecs

__all__ = ["ALGORITHMS", "AUTO_WIRES", "WIRE_CHOICES", "WIRE_DTYPES", "Allreduce", "AutoAllreduce", "CommStats",
           "MeshAllreduce", "MpiAllreduce", "RecursiveDoublingAllreduce", "RingAllreduce", "StarAllreduce",
           "WireFormat", "chunk_bounds", "make_allreduce", "probe_codecs", "probe_link"]

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
        nbytes = wire.nbytes(buf.size)
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
            buf += wire.to_fp32(scratch[i], buf.size)
        w = wire.round(buf)  # rank 0 keeps exactly what the workers get
        if self.bcast:
            comm.Bcast(w, root=0)
        else:
            self.p2p.waitall([req for r in range(1, n) for req in self.p2p.isend(w, r, _TAG)])
        self._count(nbytes * (n - 1), nbytes * (n - 1))


def chunk_bounds(size: int, n: int, align: int = 1) -> list[int]:
    """n+1 offsets cutting `size` elements into n chunks of whole `align`-element units (the last chunk
    takes the rest) whose unit counts differ by at most one; align=1: sizes differ by at most one."""
    units = -(-size // align)
    return [min(size, (i * units // n) * align) for i in range(n + 1)]


class RingAllreduce(Allreduce):
    """Reduce-scatter then all-gather around the ring rank -> rank+1: 2(N-1) steps, each moving 1/N of
    the buffer, so each rank sends about 2(N-1)/N of it whatever N (bandwidth-optimal).

    Chunk c is summed along the ring starting at rank c and ending at rank c-1, which then owns it: one
    fixed order of additions, and the all-gather forwards the owner's wire bytes unchanged, so all ranks
    hold the same bits (re-encoding a decoded int8 block need not give the same block back). On the int8
    wire, chunks are whole blocks of 32 values, so a chunk's blocks are everyone's blocks.
    """

    name = "ring"

    def _reduce(self, buf: np.ndarray) -> None:
        n, r, wire = self.comm.size, self.comm.rank, self.wire
        right, left = (r + 1) % n, (r - 1) % n
        bounds = chunk_bounds(buf.size, n, INT8_BLOCK if wire.name == "int8" else 1)

        def chunk(c: int) -> np.ndarray:
            c %= n
            return buf[bounds[c]:bounds[c + 1]]

        largest = max(bounds[c + 1] - bounds[c] for c in range(n))
        recv = [wire.empty(largest), wire.empty(largest)]  # all-gather: receive into one, forward the other
        sent = received = 0
        # Reduce-scatter: at step s, send the running sum of chunk r-s, receive and add chunk r-s-1.
        for s in range(n - 1):
            out, into = chunk(r - s), chunk(r - s - 1)
            w, rw = wire.encode(out), recv[0][:wire.size(into.size)]
            self.p2p.sendrecv(w, right, rw, left, _TAG)
            into += wire.to_fp32(rw, into.size)
            sent, received = sent + w.nbytes, received + rw.nbytes
        w = wire.round(chunk(r + 1))  # fully summed here; keep exactly what the others will get
        # All-gather: at step s, pass on chunk r+1-s (ours, then what came in at step s-1), receive chunk r-s.
        for s in range(n - 1):
            into = chunk(r - s)
            rw = recv[s % 2][:wire.size(into.size)]
            self.p2p.sendrecv(w, right, rw, left, _TAG)
            wire.decode(rw, into)
            sent, received = sent + w.nbytes, received + rw.nbytes
            w = rw
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
        total = wire.to_fp32(parts[0], buf.size).copy()
        for i in range(1, n):
            total += wire.to_fp32(parts[i], buf.size)
        buf[...] = total
        self._count(own.nbytes * (n - 1), own.nbytes * (n - 1))


class RecursiveDoublingAllreduce(Allreduce):
    """`tree`: recursive doubling. In round k rank r swaps its running sum with rank r XOR 2^k and both
    add the two: log2 N rounds of the whole buffer. With N not a power of two, each rank p2+i beyond the
    largest power of two p2 first hands its partial to rank i and gets the result back at the end.

    Both ranks of a pair add the same two (wire-rounded) values, and a + b == b + a in IEEE arithmetic,
    so all ranks agree bitwise. With extra ranks the sum is rounded once more, to what they are sent.
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
            buf += wire.to_fp32(recv, buf.size)
            received += recv.nbytes
        mask = 1
        while mask < p2:
            partner = r ^ mask
            w = wire.round(buf)  # both ranks of the pair must add the same two values
            self.p2p.sendrecv(w, partner, recv, partner, _TAG)
            buf += wire.to_fp32(recv, buf.size)
            sent, received, mask = sent + w.nbytes, received + recv.nbytes, mask * 2
        if p2 < n:  # every rank rounds, so that the ones that send to an extra rank hold what it gets
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


def probe_codecs(comm: MPI.Comm, wires: tuple[str, ...], values: int = 8192) -> dict[str, cost_model.WireCost]:
    """Each wire format's bytes per value and seconds per value to encode and decode, timed on rank 0
    (wire.measure_codecs); every rank gets rank 0's figures. Collective."""
    costs = measure_codecs(wires, values) if comm.rank == 0 else None
    costs = comm.bcast(costs, root=0)
    assert costs is not None
    return costs


class AutoAllreduce(Allreduce):
    """`auto`: probes the links (and the wire formats' encoding speed) once at start-up, then for each
    message size uses the algorithm the alpha-beta model (cost_model.py) predicts to be fastest; with
    wire="auto" (comm.dtype=auto: lossy wires allowed) the wire format too, among AUTO_WIRES. Every rank
    holds rank 0's figures, so every rank picks the same for the same size. Choices are logged on rank 0
    and kept in `choices` (bytes of the float32 message -> algorithm, wire, predicted seconds)."""

    name = "auto"

    def __init__(self, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None,
                 link: cost_model.LinkModel | None = None, codecs: dict[str, cost_model.WireCost] | None = None):
        wires = AUTO_WIRES if wire == "auto" else (wire,)
        super().__init__(comm, wires[0], links)
        self.wire_choice = wire
        self.link = link if link is not None else probe_link(comm, p2p=self.p2p)
        self.codecs = codecs if codecs is not None else probe_codecs(comm, wires)
        self.algorithms: dict[tuple[str, str], Allreduce] = {}
        for algo in cost_model.CANDIDATES:
            for w in wires:
                impl = ALGORITHMS[algo](comm, w, links)
                impl.stats = self.stats  # one set of counters for the whole run
                self.algorithms[algo, w] = impl
        self.choices: dict[int, tuple[str, str, float]] = {}
        if comm.rank == 0:
            log.info("allreduce auto: link alpha %.1f us, beta %.3f ns/B (%.2f GB/s), gamma %.3f ns/B; wire %s",
                     self.link.alpha * 1e6, self.link.beta * 1e9,
                     1e-9 / self.link.beta if self.link.beta else float("inf"), self.link.gamma * 1e9,
                     ", ".join(f"{w} enc {c.encode_s * 1e9:.2f} dec {c.decode_s * 1e9:.2f} ns/value"
                               for w, c in self.codecs.items()))

    def choose(self, values: int) -> tuple[str, str]:
        """The algorithm and wire for a message of `values` float32 values."""
        nbytes = 4 * values
        if nbytes not in self.choices:
            wires = {w: self.codecs[w] for w in (AUTO_WIRES if self.wire_choice == "auto" else (self.wire_choice,))}
            (algo, wire), predictions = cost_model.choose_wire(self.comm.size, values, self.link, wires)
            self.choices[nbytes] = (algo, wire, predictions[algo, wire])
            if self.comm.rank == 0:
                log.info("allreduce auto: %d values on %d ranks -> %s %s (predicted %s)", values, self.comm.size,
                         algo, wire, ", ".join(f"{a} {w} {t * 1e6:.0f} us" for (a, w), t in predictions.items()))
        algo, wire, _ = self.choices[nbytes]
        return algo, wire

    def _reduce(self, buf: np.ndarray) -> None:
        self.algorithms[self.choose(buf.size)]._reduce(buf)


ALGORITHMS: dict[str, type[Allreduce]] = {
    "star": StarAllreduce,
    "ring": RingAllreduce,
    "mesh": MeshAllreduce,
    "tree": RecursiveDoublingAllreduce,
    "mpi": MpiAllreduce,
    "auto": AutoAllreduce,
}


def make_allreduce(algo: str, comm: MPI.Comm, wire: str = "fp32", links: SoftwareLinks | None = None) -> Allreduce:
    if wire == "auto" and algo != "auto":
        raise ValueError("comm.dtype=auto lets comm.algo=auto choose the wire: it needs comm.algo=auto")
    return ALGORITHMS[algo](comm, wire, links)
