"""Output rows of one matmul split over the rank's threads.

torch's fp32 product for one row of activations (MKL's gemv here) uses one thread however many it has
(4096x11008: 7.44 ms at 1 thread, 7.42 at 2), so a rank with 2 threads would read its weights at one thread's
bandwidth. Each part writes its own columns of the output, so the result has the same bits as the one-thread
product. (The AVX2 kernels split their rows on torch's OpenMP threads instead, native.py; they use
worth_splitting only.)
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

PARALLEL_MIN_ROWS = 512  # per thread: below this the hand-off costs more than it saves
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def worth_splitting(n: int) -> bool:
    threads = torch.get_num_threads()
    return threads >= 2 and n >= PARALLEL_MIN_ROWS * threads


def by_rows(n: int, work: Callable[[int, int], object]) -> None:
    """work(a, b) for output rows [a, b) split in multiples of 16 over torch's thread count (one part here, the
    rest in a pool; torch releases the GIL), or all here when n is too small to pay for the hand-off."""
    global _pool, _pool_threads
    threads = torch.get_num_threads()
    if not worth_splitting(n):
        work(0, n)
        return
    if _pool is None or _pool_threads != threads:
        if _pool is not None:
            _pool.shutdown()
        _pool, _pool_threads = ThreadPoolExecutor(threads - 1, thread_name_prefix="rows"), threads
    bounds = [n * i // threads // 16 * 16 for i in range(threads)] + [n]
    parts = [_pool.submit(work, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    work(0, bounds[1])
    for f in parts:
        f.result()
