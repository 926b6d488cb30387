"""Errors a user can fix, and how a run under mpirun stops on them."""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import sys
import termios
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(Exception):
    """Bad input: reported as one line naming the problem and the fix, never as a traceback."""


_before_abort: list[Callable[[str], None]] = []


def before_abort(fn: Callable[[str], None]) -> None:
    """Have fn(message) called when this process takes the job down (a server tells its clients first)."""
    _before_abort.append(fn)


def abort(comm: Any, message: str, code: int = 2) -> NoReturn:
    """Print one line and take every rank down: a peer blocked in a collective would otherwise hang."""
    from tpi_mpi.comm import sentinel

    sentinel.stopping()  # this line says what happened: the sentinel need not add that a rank died
    for fn in _before_abort:
        try:
            fn(message)
        except Exception:  # the job is going down either way
            pass
    print(f"tpi_mpi: error: {message}", file=sys.stderr, flush=True)
    wait_until_read(sys.stderr)
    comm.Abort(code)
    raise SystemExit(code)  # only reached with a fake comm in tests


def wait_until_read(stream: Any, limit_s: float = 2.0) -> None:
    """Wait until the reader of a pipe has taken everything written to it (at most limit_s).

    Under mpirun a rank's stderr is a pipe to the launcher's proxy, and MPI_Abort makes the launcher kill
    everything: if the proxy has not read the error line by then, it is lost (MPICH's Hydra lost it in
    about 1 run in 10 here). FIONREAD on a pipe counts the bytes not yet read, whichever end asks.
    """
    try:
        fd = stream.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        deadline = time.monotonic() + limit_s
        buf = bytearray(struct.calcsize("i"))
        while time.monotonic() < deadline:
            fcntl.ioctl(fd, termios.FIONREAD, buf)
            if struct.unpack("i", buf)[0] == 0:
                return
            time.sleep(0.001)
    except (OSError, ValueError, AttributeError):  # a closed or fake stream: nothing to wait for
        return


def agree_or_abort(comm: Any, error: str | None) -> None:
    """Collective check: every rank reports its own problem (or None); rank 0 prints the first and aborts.

    Used where each rank validates what only it can see (its shard directory), so that a problem on
    rank 5 becomes one line on rank 0 instead of a hang of the seven others.
    """
    errors = comm.gather(error, root=0)
    failed = None
    if comm.rank == 0:
        failed = next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
    failed = comm.bcast(failed, root=0)
    if failed is not None:
        if comm.rank == 0:
            abort(comm, failed)
        # The other ranks wait to be killed by rank 0's Abort; Abort from every rank prints N lines.
        comm.Barrier()


def run_or_abort(comm: Any, fn: Callable[[], Any]) -> Any:
    """Run fn; a UserError becomes one line from the rank that saw it, any other failure a traceback.

    Either way every rank exits non-zero through MPI_Abort instead of leaving its peers blocked.
    """
    try:
        return fn()
    except UserError as exc:
        abort(comm, str(exc), 2)
    except KeyboardInterrupt:
        abort(comm, f"interrupted on rank {comm.rank}", 130)
    except Exception:
        traceback.print_exc()
        abort(comm, f"rank {comm.rank} failed with the traceback above", 1)
