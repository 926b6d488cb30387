"""Where a rank's layer weights come from during a forward pass: memory, or disk through a prefetcher.

A *block* is one layer's attention or FFN slice of this rank (one safetensors file each, see
split.block_file). The decoder asks for blocks in forward order with `with source.block(i, kind) as w:`
and drops them when its compute is done (before the allreduce, so that reading overlaps communication).

LayerPrefetcher: a background thread reads the streamed blocks, in forward order and round and round
(after the last layer of a token comes the first of the next), into a fixed pool of `window` buffers:
at most `window` streamed blocks are ever in memory, the one being computed included. Blocks kept
resident (partial residency) are read once at start-up and skipped by the stream.

How blocks are read, measured on a 176 MiB FFN block of the Llama-2-70B shape at N=8 (fp16; cold page
cache; median of 5; this machine, load ~0.5; `python -m tpi_mpi.bench.memory --read-methods` repeats it):
    os.preadv into a reused buffer            84 ms  2.10 GB/s   <- used
    file.readinto into a reused buffer        84 ms  2.10 GB/s   (same syscall path)
    os.preadv into a fresh buffer            100 ms  1.75 GB/s   (page faults on the new memory)
    mmap + copy into a reused buffer          98 ms  1.80 GB/s
    safetensors load_file (+ copy out)       124 ms  1.42 GB/s
preadv into a buffer we own is the fastest and keeps the memory ours: the pages are evicted from the
cache as soon as they are copied (tensorfile.pread_into), so cached file pages, which a memory cgroup
counts, never pile up. With mmap or load_file the weights would *be* page cache, evictable only by
unmapping.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tpi_mpi.weights import quant, tensorfile

BlockKey = tuple[int, str]  # (layer, "attn" | "ffn")
Weights = dict[str, torch.Tensor]


class BlockSource(Protocol):
    stats: StreamStats

    def block(self, layer: int, kind: str) -> AbstractContextManager[Weights]: ...

    def wait_filled(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class StreamStats:
    disk_wait_s: float = 0.0  # time the compute stood waiting for a block still being read
    bytes_read: int = 0  # weight bytes read from disk, start-up included
    blocks_read: int = 0
    head_bytes_read: int = 0  # of those, lm_head's (or its vocabulary slice's)
    max_blocks_held: int = 0  # most streamed blocks in memory at once (never more than the window)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # reader thread and compute both add

    def add(self, bytes_read: int = 0, wait_s: float = 0.0, blocks: int = 0, head_bytes: int = 0) -> None:
        with self.lock:
            self.bytes_read += bytes_read + head_bytes
            self.head_bytes_read += head_bytes
            self.disk_wait_s += wait_s
            self.blocks_read += blocks

    def to_json(self) -> dict[str, Any]:
        return {"disk_wait_s": self.disk_wait_s, "bytes_read": self.bytes_read, "blocks_read": self.blocks_read,
                "head_bytes_read": self.head_bytes_read, "max_blocks_held": self.max_blocks_held}


def cast_block(w: Weights, dtype: torch.dtype | None) -> Weights:
    """Float tensors to model.dtype; packed weights and their scales stay as stored (quant.py)."""
    if dtype is None:
        return w
    return {k: v if quant.is_quant_tensor(k) else v.to(dtype) for k, v in w.items()}


def load_block(tf: tensorfile.TensorFile, dtype: torch.dtype | None) -> tuple[Weights, int]:
    w, n = tensorfile.load(tf)
    return cast_block(w, dtype), n


class ResidentBlocks:
    """Every block in memory, read once (the memory.resident=true path)."""

    def __init__(self, files: dict[BlockKey, tensorfile.TensorFile], dtype: torch.dtype | None):
        self.stats = StreamStats()
        self.blocks: dict[BlockKey, Weights] = {}
        for key, tf in files.items():
            self.blocks[key], n = load_block(tf, dtype)
            self.stats.bytes_read += n

    @contextmanager
    def block(self, layer: int, kind: str) -> Iterator[Weights]:
        yield self.blocks[(layer, kind)]

    def wait_filled(self) -> None:
        pass  # read in full by the constructor

    def close(self) -> None:
        pass


class LayerPrefetcher:
    """Streams the blocks in `streamed` (forward order) through `window` buffers; `resident` blocks are
    read once now and kept. A failure in the reading thread is raised in the compute thread."""

    def __init__(self, files: dict[BlockKey, tensorfile.TensorFile], streamed: list[BlockKey],
                 window: int, dtype: torch.dtype | None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.files = files
        self.order = streamed
        self.dtype = dtype
        self.stats = StreamStats()
        self.resident: dict[BlockKey, Weights] = {}
        streamed_set = set(streamed)
        for key in files:
            if key not in streamed_set:
                self.resident[key], n = load_block(files[key], dtype)
                self.stats.bytes_read += n
        self.held = 0  # streamed blocks in memory: taken a buffer, not yet released
        self._lock = threading.Lock()
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        self._ready: queue.Queue[tuple[BlockKey, Weights, torch.Tensor] | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._filled = threading.Event()  # the first min(window, streamed) blocks are read (or reading failed)
        self._next = 0  # index in self.order of the block the compute asks for next
        self._thread: threading.Thread | None = None
        if streamed:
            size = max(files[k].data_bytes for k in streamed)
            for _ in range(window):
                self._free.put(tensorfile.weight_buffer(size))
            self._thread = threading.Thread(target=self._read_loop, name="layer-prefetcher", daemon=True)
            self._thread.start()

    @property
    def buffer_bytes(self) -> int:
        return self.window * max((self.files[k].data_bytes for k in self.order), default=0)

    def _read_loop(self) -> None:
        i = 0
        try:
            while True:
                buf = self._free.get()
                if buf is None or self._stop.is_set():
                    return
                with self._lock:
                    self.held += 1
                    # The invariant the window promises; checked here, where it could break.
                    assert self.held <= self.window, f"{self.held} blocks held with a window of {self.window}"
                    self.stats.max_blocks_held = max(self.stats.max_blocks_held, self.held)
                key = self.order[i]
                w, n = tensorfile.load(self.files[key], buf)
                self.stats.add(bytes_read=n, blocks=1)
                self._ready.put((key, cast_block(w, self.dtype), buf))
                if i + 1 >= min(self.window, len(self.order)):
                    self._filled.set()
                i = (i + 1) % len(self.order)
        except BaseException as exc:  # noqa: B036 - handed to the compute thread, which raises it
            self._ready.put(exc)
            self._filled.set()  # the failure surfaces at the first block() instead

    def wait_filled(self) -> None:
        """Block until the window holds the first blocks of a forward pass. A server is in this state whenever
        it waits for a request; waiting for it at start-up makes the first prompt's latency the same whatever
        start-up took (otherwise the prefetcher's head start, e.g. while the tokenizer loads, is in it)."""
        if self._thread is not None:
            self._filled.wait()

    @contextmanager
    def block(self, layer: int, kind: str) -> Iterator[Weights]:
        key = (layer, kind)
        if key in self.resident:
            yield self.resident[key]
            return
        t0 = time.perf_counter()
        item = self._ready.get()
        self.stats.add(wait_s=time.perf_counter() - t0)
        if isinstance(item, BaseException):
            raise item
        got, w, buf = item
        expected = self.order[self._next]
        if got != key or expected != key:
            raise RuntimeError(f"prefetcher out of step: asked for {key}, next in order {expected}, read {got}")
        self._next = (self._next + 1) % len(self.order)
        try:
            yield w
        finally:
            w.clear()  # the views into the buffer go before the buffer is reused
            with self._lock:
                self.held -= 1
            self._free.put(buf)

    def close(self) -> None:
        """Stop the reading thread (it may be blocked waiting for a free buffer)."""
        self._stop.set()
        self._free.put(None)
        if self._thread is not None:
            self._thread.join()
