"""Safetensors files read with our own header parser, so that weights can be read with os.preadv into
buffers we own (reused across blocks) instead of through a library that allocates on every load.

The header is untrusted input: it is validated completely BEFORE anything is allocated from it
(length capped and inside the file, dtypes known, shape x itemsize equal to the byte span, offsets in
bounds, tensors neither overlapping nor leaving holes). A bad file gives one UserError naming it.

Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N bytes of
JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data;
offsets are relative to the start of the data.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpi_mpi.errors import UserError, os_error_from

# The safetensors library's own cap: a header larger than this is refused before it is read.
MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}
# Reads go in chunks, each evicted from the page cache right after it is copied into our buffer: the
# bytes are then held once (in the buffer), and a memory cgroup, which counts page cache, sees at most
# one chunk of cache per reading thread.
READ_CHUNK_BYTES = 16 * 1024 * 1024
# The transparent huge page size of x86-64 (weight_buffer advises the whole ones inside a buffer).
HUGE_PAGE_BYTES = 2 * 1024 * 1024
_libc = None


def _madvise_huge(buffer: torch.Tensor) -> None:
    """Advise the whole 2 MiB pages inside `buffer` (not yet touched) to be transparent huge pages. Where THP is
    'madvise' (this host's and many distributions' default), weights otherwise sit on 4 KiB pages, and a decoding
    step, which reads every weight once, then misses the TLB every 4 KiB: a kernel of ours read 25 GB/s of int8
    weights on 4 KiB pages and 29 on huge pages (docs/quantization.md). Advice only: never fails."""
    global _libc
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or buffer.nbytes < 2 * HUGE_PAGE_BYTES:
        return
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = -(-buffer.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (buffer.data_ptr() + buffer.nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end > start:
        _libc.madvise(start, end - start, advice)


def weight_buffer(nbytes: int) -> torch.Tensor:
    """uint8 [nbytes], uninitialised, on huge pages where the kernel allows it (_madvise_huge says why)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    _madvise_huge(buffer)
    return buffer


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # byte offsets relative to the start of the data
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class TensorFile:
    path: Path
    data_offset: int  # where the data starts in the file (8 + header length)
    data_bytes: int
    entries: dict[str, TensorEntry]


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a valid safetensors file ({why}): split the model again")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_header(path: str | Path) -> TensorFile:
    """Read and validate the header of a safetensors file. Nothing is sized from the file before the
    check that it fits in the file (and under MAX_HEADER_BYTES)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
            if 8 + n > size:
                raise _bad(path, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    data_bytes = size - 8 - n
    entries: list[TensorEntry] = []
    for name, meta in header.items():
        if name == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise _bad(path, "__metadata__ is not a map of strings")
            continue
        if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
            raise _bad(path, f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if dtype not in DTYPES:
            raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _bad(path, f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _bad(path, f"tensor {name!r} has data_offsets {offsets!r}, not two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise _bad(path, f"tensor {name!r} spans bytes [{begin}, {end}) outside the {data_bytes} data bytes")
        if math.prod(shape) * ITEMSIZE[dtype] != end - begin:
            raise _bad(path, f"tensor {name!r} of shape {shape} and dtype {dtype} needs "
                             f"{math.prod(shape) * ITEMSIZE[dtype]} bytes but spans {end - begin}")
        entries.append(TensorEntry(name, dtype, tuple(shape), begin, end))
    covered = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < covered:
            raise _bad(path, f"tensor {e.name!r} overlaps the tensor before it")
        if e.begin > covered:
            raise _bad(path, f"bytes [{covered}, {e.begin}) belong to no tensor")
        covered = e.end
    if covered != data_bytes:
        raise _bad(path, f"bytes [{covered}, {data_bytes}) at the end belong to no tensor")
    return TensorFile(path, 8 + n, data_bytes, {e.name: e for e in entries})


def drop_cache(fd: int, offset: int = 0, length: int = 0) -> None:
    """Evict the file's pages from the page cache (length 0: to the end). Advice only: never fails."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def pread_into(fd: int, out: memoryview, offset: int) -> None:
    """Fill `out` from the file at `offset`, chunk by chunk, evicting each chunk's page cache."""
    done = 0
    while done < len(out):
        chunk = out[done:done + READ_CHUNK_BYTES]
        got = os.preadv(fd, [chunk], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        drop_cache(fd, offset + done, got)
        done += got


def tensors_from(tf: TensorFile, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views into `data` (uint8, the file's data section) shaped as the file says."""
    out = {}
    for e in tf.entries.values():
        raw = data[e.begin:e.end]
        if e.begin % ITEMSIZE[e.dtype]:  # a foreign file with unaligned offsets: copy once
            raw = raw.clone()
        out[e.name] = raw.view(e.torch_dtype).view(e.shape)
    return out


def load(tf: TensorFile, buffer: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """All tensors of the file, read with preadv into `buffer` (uint8, at least tf.data_bytes; a new
    one when None). The tensors are views into the buffer. Returns them and the bytes read."""
    if buffer is None:
        buffer = weight_buffer(tf.data_bytes)
    if buffer.numel() < tf.data_bytes:
        raise ValueError(f"buffer of {buffer.numel()} bytes for {tf.path} ({tf.data_bytes} bytes)")
    data = buffer[:tf.data_bytes]
    fd = os.open(tf.path, os.O_RDONLY)
    try:
        pread_into(fd, data.numpy().data, tf.data_offset)
    finally:
        os.close(fd)
    return tensors_from(tf, data), tf.data_bytes


def read_rows(tf: TensorFile, name: str, rows: list[int] | range,
              buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Rows `rows` (along the first dimension) of tensor `name` of 2 or more dimensions (e.g. embedding rows of
    the prompt's ids, or a vocabulary chunk of lm_head), without reading the rest of the tensor; into `buffer`
    (uint8) when given. Returns [len(rows), *the other dimensions] and the bytes read."""
    e = tf.entries[name]
    if len(e.shape) < 2:
        raise ValueError(f"{name} in {tf.path} has no rows (it is {len(e.shape)}-D)")
    n_rows, inner = e.shape[0], list(e.shape[1:])
    row_bytes = math.prod(inner) * ITEMSIZE[e.dtype]
    if buffer is None:
        buffer = weight_buffer(len(rows) * row_bytes)
    out = buffer[:len(rows) * row_bytes].view(e.torch_dtype).view(len(rows), *inner)
    view = out.view(torch.uint8).reshape(-1).numpy().data
    fd = os.open(tf.path, os.O_RDONLY)
    try:
        if isinstance(rows, range) and rows.step == 1:  # one contiguous span
            if rows.start < 0 or rows.stop > n_rows:
                raise IndexError(f"rows {rows} outside {name} [0, {n_rows})")
            pread_into(fd, view, tf.data_offset + e.begin + rows.start * row_bytes)
        else:
            for i, r in enumerate(rows):
                if not 0 <= r < n_rows:
                    raise IndexError(f"row {r} outside {name} [0, {n_rows})")
                pread_into(fd, view[i * row_bytes:(i + 1) * row_bytes], tf.data_offset + e.begin + r * row_bytes)
    finally:
        os.close(fd)
    return out, len(rows) * row_bytes


def read_tensor(tf: TensorFile, name: str) -> tuple[torch.Tensor, int]:
    """One tensor of the file, read alone into its own memory. Returns it and the bytes read."""
    if name not in tf.entries:
        raise UserError(f"{tf.path} has no tensor {name!r}: split the model again")
    e = tf.entries[name]
    out = weight_buffer(e.nbytes)
    fd = os.open(tf.path, os.O_RDONLY)
    try:
        pread_into(fd, out.numpy().data, tf.data_offset + e.begin)
    finally:
        os.close(fd)
    return out.view(e.torch_dtype).view(e.shape), e.nbytes


def save(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with a failure of the disk (full: safetensors says so only in text) raised as
    the OSError it is, naming the file: one line naming the path instead of a library's traceback."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:
        os_exc = os_error_from(exc, path)
        if os_exc is None:
            raise
        raise os_exc from exc
