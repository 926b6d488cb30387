"""The delay daemon: holds every bridged packet for its link's one-way latency, where the kernel has no netem.

    ip netns exec <session>-hub python -m tpi_mpi.emulate.delayd --queue 0 --ready-fd N

iptables (netns.py) queues each packet crossing the hub's bridge to NFQUEUE with its delay in microseconds
as the packet mark; this process releases it (accept) once that delay has passed since the kernel queued
it. Packets of one link keep their order (same delay, released in arrival order). On SIGTERM/SIGINT it
releases what it holds and exits; with --queue-bypass in the rule, packets then pass undelayed.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from tpi_mpi.errors import main_guard


def _realtime_priority() -> None:
    """Release times matter more than anything else on a shared 2-core box: ask for a real-time
    scheduling class (the daemon only ever sleeps in select, so it cannot starve the others)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        try:
            os.nice(-10)
        except OSError:
            pass


def serve(queue: int, ready_fd: int | None) -> None:
    from netfilterqueue import COPY_META, NetfilterQueue

    held: list[tuple[float, int, Any]] = []  # (release time, arrival number, packet)
    order = itertools.count()

    def on_packet(pkt: Any) -> None:
        # The mark is the delay in microseconds. Measured from now: the kernel's own timestamp is not
        # set on bridged packets, and we are woken within ~0.1 ms of the packet being queued.
        heapq.heappush(held, (time.monotonic() + pkt.get_mark() * 1e-6, next(order), pkt))

    nfq = NetfilterQueue()
    nfq.bind(queue, on_packet, max_len=20000, mode=COPY_META)  # headers only: no payload copies
    sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    _realtime_priority()
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    try:
        while not stop:
            timeout = max(0.0, held[0][0] - time.monotonic()) if held else 0.2
            try:
                readable, _, _ = select.select([sock], [], [], timeout)
            except InterruptedError:
                continue
            if readable:
                nfq.run(block=False)  # every queued packet goes through on_packet
            now = time.monotonic()
            while held and held[0][0] <= now:
                heapq.heappop(held)[2].accept()
    finally:
        while held:
            heapq.heappop(held)[2].accept()
        nfq.unbind()
        sock.close()


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=int, default=0)
    p.add_argument("--ready-fd", type=int, default=None, help="write 'ready' here once the queue is bound")
    p.add_argument("--session", default="", help="only to name the process (so `down` can tell it is ours)")
    args = p.parse_args(argv)
    serve(args.queue, args.ready_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
