"""Writing run records without ever leaving a half-written file behind, also on a full disk: a write that
fails leaves the earlier records as they were and raises an OSError naming the file."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: str | Path, record: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, then rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk fails in a write or the close, which name no file
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, f"{exc.strerror} (not written; an earlier file there is unchanged)",
                      str(path)) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line with one write() on an O_APPEND file, under an exclusive lock (other runs appending
    to the same file wait their turn). A line that a writer killed mid-write left unterminated is cut off
    first, so that every line stays one whole record; earlier records are never touched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if this process dies
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            size = _end_of_last_line(fd, size)
            os.ftruncate(fd, size)
        try:
            # A full disk can take part of the line (a short write) or none of it (ENOSPC).
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as exc:
            os.ftruncate(fd, size)  # whatever part of the line got in: the file ends with the last whole record
            raise OSError(exc.errno, f"{exc.strerror} (the record was not appended; the earlier records are "
                          "intact)", str(path)) from exc
    finally:
        os.close(fd)


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just past the last newline of the file (0 if none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - (1 << 16))
        chunk = os.pread(fd, pos - start, start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            return start + nl + 1
        pos = start
    return 0


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every whole record; an unterminated last line (a writer killed mid-write) is not a record."""
    lines = Path(path).read_text().split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]
