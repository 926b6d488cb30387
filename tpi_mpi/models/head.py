"""lm_head, or a rank's vocabulary slice of it (memory.head=split): float or packed (weights/quant.py), kept in
memory or read at every use in vocabulary chunks into reused buffers (memory=stream / budget).

Every tensor of a head has one row per vocabulary row (quant.quantize_head), so a run of rows is one contiguous
read of each; packed int4 rows are padded to whole layout blocks, and the chunks are whole blocks too.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tpi_mpi.models.linear import linear
from tpi_mpi.weights import quant, tensorfile
from tpi_mpi.weights.tensorfile import TensorFile


def head_entries(file: TensorFile, name: str) -> list[tensorfile.TensorEntry]:
    """The tensors of head `name` (lm_head, or embed_tokens when tied) in a file."""
    return [e for k, e in file.entries.items() if k.startswith(name + ".")]


def head_bytes(file: TensorFile, name: str) -> int:
    return sum(e.nbytes for e in head_entries(file, name))


class LMHead:
    """logits(h): float32 [positions, rows] for the hidden states h after the final norm."""

    def __init__(self, file: TensorFile, name: str, rows: int, resident: bool, cast: torch.dtype | None,
                 stats: Any, chunk_bytes: int):
        """`name`: lm_head, or embed_tokens (a tied float head); `rows`: the real vocabulary rows (packed int4
        rows are padded); `stats`: the block source's StreamStats, which counts the bytes read."""
        self.file, self.rows, self.cast, self.stats = file, rows, cast, stats
        self.entries = head_entries(file, name)
        self.padded_rows = self.entries[0].shape[0]
        self.tensors: dict[str, torch.Tensor] | None = None
        self.buffers: list[torch.Tensor] = []
        if resident:
            read = {}
            for e in self.entries:
                read[e.name], n = tensorfile.read_tensor(file, e.name)
                stats.add(head_bytes=n)
            self.tensors = self._kernel_tensors(read)
            return
        row_bytes = sum(e.nbytes // e.shape[0] for e in self.entries)
        block = quant.HEAD_ROW_BLOCK if any(e.name.endswith(".scales_zeros_rows") for e in self.entries) else 1
        self.chunk_rows = max(block, chunk_bytes // row_bytes // block * block)
        chunk = min(self.chunk_rows, self.padded_rows)
        self.buffers = [tensorfile.weight_buffer(chunk * (e.nbytes // e.shape[0])) for e in self.entries]

    def _kernel_tensors(self, read: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """As quant.linear takes them, named lm_head.*; a float head cast to the compute dtype."""
        if any(quant.is_quant_tensor(k) for k in read):
            return quant.head_kernel_tensors(read)
        (w,) = read.values()
        return {"lm_head.weight": w.to(self.cast) if self.cast is not None else w}

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.tensors is not None:
            return linear(h, self.tensors, "lm_head")[:, :self.rows].float()
        logits = torch.empty((h.shape[0], self.padded_rows), dtype=torch.float32)
        for r0 in range(0, self.padded_rows, self.chunk_rows):
            rows = range(r0, min(r0 + self.chunk_rows, self.padded_rows))
            t0 = time.perf_counter()
            read, n = {}, 0
            for e, buf in zip(self.entries, self.buffers, strict=True):
                read[e.name], got = tensorfile.read_rows(self.file, e.name, rows, buf)
                n += got
            self.stats.add(head_bytes=n, wait_s=time.perf_counter() - t0)
            logits[:, r0:rows.stop] = linear(h, self._kernel_tensors(read), "lm_head")
        return logits[:, :self.rows]
