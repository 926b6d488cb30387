"""Names the rank that died.

MPICH's mpiexec (hydra) SIGKILLs every other rank the moment one rank dies, and prints only the dead
process's pid: no rank lives long enough to say which rank it was. So rank 0 starts this small process
outside mpiexec's reach (a session of its own) at start-up. It waits on a pidfd of every rank on rank 0's
host (ranks on other hosts are not visible to it) and, when one exits, prints one line naming it, then
exits itself: it never outlives rank 0.

A rank that stops the job on purpose (tpi_mpi's own error line and MPI_Abort, or the normal end) first
removes the sentinel's marker directory, so that the sentinel keeps quiet then. Removing it (rather than
writing into it) means nothing is left behind even when a batch system SIGKILLs the sentinel with the job.
Standard library only (tpi_mpi.errors and faults are too): it starts in ~30 ms.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tpi_mpi import errors
from tpi_mpi.faults import fail_point

_marker: Path | None = None  # the sentinel's marker directory, if one watches: removed = "stopping on purpose"


def start(comm: Any) -> None:
    """Collective, once per process: rank 0 starts the sentinel for the ranks on its host."""
    global _marker
    if comm.rank != 0:
        fail_point("sentinel", comm.rank)
    if stopping not in errors.BEFORE_ABORT:
        errors.BEFORE_ABORT.append(stopping)  # an abort says what happened itself: keep quiet then
    me = (socket.gethostname(), os.getpid())
    ranks = comm.gather(me, root=0)
    marker = None
    if comm.rank == 0 and hasattr(os, "pidfd_open"):
        watch = {r: pid for r, (host, pid) in enumerate(ranks) if host == me[0]}
        fail_point("sentinel", 0)  # where a full TMPDIR fails (tests/test_full_disk.py does that for real)
        # In $TMPDIR itself: Python's tempfile would skip a full one for /tmp, /var/tmp or even the current
        # directory, where a job killed with SIGKILL would leave the directory among the user's files.
        try:
            base = os.environ.get("TMPDIR") or tempfile.gettempdir()
        except FileNotFoundError as exc:  # no candidate writable: the disk is full (the usual cause)
            raise errors.UserError(f"{exc.strerror} (full, read-only or missing): set TMPDIR to a folder with "
                                   "space") from None
        try:
            marker = tempfile.mkdtemp(prefix="tpi_mpi-sentinel-", dir=base)
        except OSError as exc:  # rank 0 raises, main_guard aborts every rank with one line naming the path
            raise OSError(exc.errno, f"{exc.strerror} (making the sentinel's directory in TMPDIR)", base) from exc
        # Removed by rank 0 when it exits normally (the sentinel may be killed with the job, e.g. by Slurm),
        # else by the sentinel; a missing directory means "stopping on purpose".
        atexit.register(shutil.rmtree, marker, True)
        subprocess.Popen([sys.executable, "-m", "tpi_mpi.comm.sentinel", json.dumps(watch), marker],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    marker = comm.bcast(marker, root=0)
    _marker = Path(marker) if marker else None


def stopping() -> None:
    """This rank ends the job on purpose (an error it reports itself, or the normal end): keep quiet.

    On another host than rank 0 the directory is not there, and the sentinel does not watch the rank."""
    if _marker is not None:
        shutil.rmtree(_marker, ignore_errors=True)


def watch(ranks: dict[int, int], marker: Path) -> str | None:
    """Block until a watched rank exits; the line to print, or None if the job was stopping on purpose."""
    fds: dict[int, int] = {}
    gone: list[int] = []
    for r, pid in ranks.items():
        try:
            fds[os.pidfd_open(pid)] = r
        except ProcessLookupError:
            gone.append(r)
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while not gone:
        ready = sorted(fds[fd] for fd, _ in poller.poll())
        for fd in [fd for fd, r in fds.items() if r in ready]:
            poller.unregister(fd)
        if not marker.exists():  # a rank stopped on purpose (its error line, or the normal end)
            if 0 in ready:
                return None
            continue
        gone = ready
    names = ", ".join(f"rank {r} (pid {ranks[r]})" for r in gone)
    return (f"tpi_mpi: error: {names} died without a word (killed by a signal, out of memory, or a crash "
            "in native code); mpiexec stopped the other ranks")


def main() -> None:
    ranks = {int(r): pid for r, pid in json.loads(sys.argv[1]).items()}
    marker = Path(sys.argv[2])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up below when a batch system ends the job
    try:
        line = watch(ranks, marker)
        if line:
            print(line, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(marker, ignore_errors=True)


if __name__ == "__main__":
    main()
