"""Point-to-point messages of the allreduce algorithms, optionally through a software link model.

`emulation.links=software` (no root needed): every point-to-point message from rank a to rank b is
delivered no earlier than latency(a, b) + bytes / bandwidth(a, b) after it was sent, and the messages on
one link queue behind each other (a link carries one message at a time, at its bandwidth). The sender
works out the delivery time and sends it ahead of the data in a small message of its own (the "stamp");
the receiver, once it has the data, waits until then. Times are CLOCK_MONOTONIC, which every process of
one host shares: the model is for ranks on one machine (real devices have real links).

Without a model, `P2P` is the plain MPI calls; the algorithms in allreduce.py only ever talk through it.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import numpy as np
from mpi4py import MPI

_STAMP_TAG = 18  # the data goes with the caller's tag; the stamp with this one, always just before it


class Profile(Protocol):
    def latency_s(self, src: int, dst: int) -> float: ...
    def bandwidth_bit_s(self, src: int, dst: int) -> float: ...


class SoftwareLinks:
    """This rank's outgoing links, as modelled: latency and seconds per byte to each peer, and until when
    each link is still busy with what was sent before."""

    def __init__(self, rank: int, size: int, profile: Profile):
        self.rank = rank
        self.latency = [profile.latency_s(rank, d) for d in range(size)]
        self.seconds_per_byte = [8 / profile.bandwidth_bit_s(rank, d) for d in range(size)]
        self.busy_until = [0.0] * size

    def stamp(self, dest: int, nbytes: int) -> np.ndarray:
        """Delivery time of a message of `nbytes` sent to `dest` now (and the link is busy until it is out)."""
        start = max(time.monotonic(), self.busy_until[dest])
        self.busy_until[dest] = start + nbytes * self.seconds_per_byte[dest]
        return np.array([self.busy_until[dest] + self.latency[dest]], dtype=np.float64)

    @staticmethod
    def deliver(stamp: np.ndarray) -> None:
        """Wait until the delivery time in `stamp` (sleeping: the other ranks share our cores)."""
        remaining = float(stamp[0]) - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)


class _Incoming:
    """A posted receive under the link model: done once both the stamp and the data are in and the
    modelled delivery time has come."""

    def __init__(self, reqs: list[MPI.Request], stamp: np.ndarray):
        self.reqs, self.stamp = reqs, stamp

    def Wait(self) -> None:  # noqa: N802 (the name of MPI.Request's method, so both are waited on alike)
        MPI.Request.Waitall(self.reqs)
        SoftwareLinks.deliver(self.stamp)


class P2P:
    """Send, Recv, Isend, Irecv, Sendrecv between ranks of `comm`, through `links` when given."""

    def __init__(self, comm: MPI.Comm, links: SoftwareLinks | None = None):
        self.comm, self.links = comm, links

    def send(self, buf: np.ndarray, dest: int, tag: int) -> None:
        if self.links is not None:
            self.comm.Send(self.links.stamp(dest, buf.nbytes), dest=dest, tag=_STAMP_TAG)
        self.comm.Send(buf, dest=dest, tag=tag)

    def recv(self, buf: np.ndarray, source: int, tag: int) -> None:
        if self.links is None:
            self.comm.Recv(buf, source=source, tag=tag)
            return
        stamp = np.empty(1, dtype=np.float64)
        self.comm.Recv(stamp, source=source, tag=_STAMP_TAG)
        self.comm.Recv(buf, source=source, tag=tag)
        self.links.deliver(stamp)

    def isend(self, buf: np.ndarray, dest: int, tag: int) -> list[MPI.Request]:
        if self.links is None:
            return [self.comm.Isend(buf, dest=dest, tag=tag)]
        return [self.comm.Isend(self.links.stamp(dest, buf.nbytes), dest=dest, tag=_STAMP_TAG),
                self.comm.Isend(buf, dest=dest, tag=tag)]

    def irecv(self, buf: np.ndarray, source: int, tag: int) -> Any:
        """A request with .Wait(): MPI's own, or one that also waits for the modelled delivery."""
        if self.links is None:
            return self.comm.Irecv(buf, source=source, tag=tag)
        stamp = np.empty(1, dtype=np.float64)
        return _Incoming([self.comm.Irecv(stamp, source=source, tag=_STAMP_TAG),
                          self.comm.Irecv(buf, source=source, tag=tag)], stamp)

    def sendrecv(self, out: np.ndarray, dest: int, into: np.ndarray, source: int, tag: int) -> None:
        if self.links is None:
            self.comm.Sendrecv(out, dest=dest, sendtag=tag, recvbuf=into, source=source, recvtag=tag)
            return
        stamp = np.empty(1, dtype=np.float64)
        self.comm.Sendrecv(self.links.stamp(dest, out.nbytes), dest=dest, sendtag=_STAMP_TAG,
                           recvbuf=stamp, source=source, recvtag=_STAMP_TAG)
        self.comm.Sendrecv(out, dest=dest, sendtag=tag, recvbuf=into, source=source, recvtag=tag)
        self.links.deliver(stamp)

    @staticmethod
    def waitall(reqs: list[Any]) -> None:
        if all(isinstance(r, MPI.Request) for r in reqs):
            MPI.Request.Waitall(reqs)
        else:
            for r in reqs:
                r.Wait()
