"""Errors a user can fix, and how a run under mpirun stops on them."""

from __future__ import annotations

import errno
import fcntl
import functools
import io
import os
import re
import stat
import struct
import sys
import termios
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
# A full or read-only disk is the machine's state, not a bug: one line naming the path, no traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class UserError(Exception):
    """Bad input: reported as one line naming the problem and the fix, never as a traceback."""


# Called before an abort: the sentinel (comm/sentinel.py) registers its `stopping`, since this line says
# what happened and the sentinel need not add that a rank died. (A list, so that this module imports
# nothing of tpi_mpi and every module can use it.)
BEFORE_ABORT: list[Callable[[], None]] = []
_before_abort: list[Callable[[str], None]] = []


def before_abort(fn: Callable[[str], None]) -> None:
    """Have fn(message) called when this process takes the job down (a server tells its clients first)."""
    _before_abort.append(fn)


def abort(comm: Any, message: str, code: int = 2) -> NoReturn:
    """Print one line and take every rank down: a peer blocked in a collective would otherwise hang."""
    for hook in BEFORE_ABORT:
        hook()
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
    """Run fn; a UserError becomes one line from the rank that saw it, any other failure a traceback and a
    line naming the rank and the error. Either way every rank exits non-zero through MPI_Abort instead of
    leaving its peers blocked."""
    try:
        return fn()
    except (Exception, KeyboardInterrupt) as exc:
        fail(exc, comm)


def main_guard(fn: F) -> F:
    """Decorator for the main() of every entry point: an uncaught exception on any rank ends the whole job.

        @main_guard
        def main(argv: list[str] | None = None) -> int: ...

    Under mpirun a rank that raised would otherwise exit, or hang in MPI_Finalize, while its peers wait in a
    collective for ever (rank 0 failing in the sentinel's mkdtemp on a full disk held a job for 10 minutes).
    With the guard that rank prints one `tpi_mpi: error:` line naming itself and the error (after the
    traceback, unless the error is the user's or the disk's) and MPI_Abort ends every rank; an uncaught
    exception in another thread does the same. In a single process (MPI not initialised, or a world of one:
    a driver that only starts mpirun, `split`, a test calling main()) there is no peer to release: the same
    line and SystemExit with the same status, no Abort. SystemExit passes through: an entry point's own
    sys.exit is its decision."""

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        previous, threading.excepthook = threading.excepthook, _thread_excepthook
        try:
            return fn(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:
            fail(exc, mpi_world())
        finally:
            threading.excepthook = previous

    return guarded  # type: ignore[return-value]


def fail(exc: BaseException, comm: Any = None) -> NoReturn:
    """The one line for exc (and its traceback if it is a bug), then MPI_Abort of every rank, or without
    MPI (comm None) SystemExit with the same status: 2 the user's error, 130 interrupted, 1 anything else."""
    where = f"rank {comm.rank}: " if comm is not None else ""
    if isinstance(exc, UserError):
        code, message = 2, str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        code, message = 130, "interrupted" + (f" on rank {comm.rank}" if comm is not None else "")
    else:
        code, message = 1, where + describe(exc)
        if not (isinstance(exc, OSError) and exc.errno in DISK_ERRNOS):
            traceback.print_exception(exc)
            message += " (traceback above)"
    message = message.replace("\n", " ")  # one line, whatever the exception's text
    if comm is not None:
        abort(comm, message, code)
    print(f"tpi_mpi: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def describe(exc: BaseException) -> str:
    """`Type: message`; a full or read-only disk as `PATH: what happened: what to do`. A failed write() or
    close() names no file: the file being written is named instead."""
    if not isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc}"
    name = exc.filename if exc.filename is not None else _file_being_written(exc.__traceback__)
    if exc.errno in DISK_ERRNOS:
        hint = "write elsewhere" if exc.errno == errno.EROFS else "free space there or write elsewhere"
        return f"{name + ': ' if name else ''}{exc.strerror}: {hint}"
    return f"{type(exc).__name__}: {exc}" + (f" (writing {name})" if name and exc.filename is None else "")


def os_error_from(exc: BaseException, path: Any) -> OSError | None:
    """The OSError a library reported as text (safetensors: `I/O error: No space left on device (os error
    28)`), naming `path`; None if exc carries no OS error number."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def _file_being_written(tb: TracebackType | None) -> str | None:
    """The open file object nearest to where the exception was raised (innermost frame first): a write or a
    close that fails with ENOSPC names no file, but the frame doing it holds the file object (Hydra's
    `with open(...) as file`)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            name = getattr(value, "name", None) if isinstance(value, io.IOBase) else None
            if isinstance(name, str):
                return name
    return None


def mpi_world() -> Any:
    """MPI.COMM_WORLD if this process is one of several MPI ranks (initialised, not finalised), else None.
    Never imports mpi4py: a driver that does not use MPI must not initialise it."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.size < 2:
        return None
    return mpi.COMM_WORLD


def _thread_excepthook(args: Any) -> None:
    """An uncaught exception in a helper thread: under MPI the main thread may be waiting on what that thread
    would have done, so the job ends as for one in the main thread; without MPI, Python's default."""
    comm = mpi_world()
    if comm is None or args.exc_type is SystemExit or args.exc_value is None:
        threading.__excepthook__(args)
        return
    fail(args.exc_value, comm)
