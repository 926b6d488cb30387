"""How much memory this process holds: peak and current RSS, and the heap malloc has handed out."""

from __future__ import annotations

import ctypes
import resource

import psutil


def process_memory() -> tuple[int, int, int | None]:
    """(peak, current) resident memory of this process in bytes, and the bytes malloc has handed out.

    RSS hides a small leak: memory freed after loading stays resident and is reused first. The heap in
    use (glibc's mallinfo2: small blocks + mmapped ones, which is where torch's tensors live) does not.
    """
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, psutil.Process().memory_info().rss,
            _heap_in_use())


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int | None:
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except AttributeError:
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)
