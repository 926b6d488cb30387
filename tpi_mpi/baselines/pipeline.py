"""Pipeline parallelism, the baseline TPI-LLM argues against (`baseline=pipeline`).

Every rank holds a contiguous range of whole layers (a world_size=1 split: only the rank's own layer
files are read). Rank 0 embeds the tokens, runs its layers and sends the hidden states to rank 1, which
runs its layers and sends them on; the last rank sends them back to rank 0, which applies the final norm
and lm_head and samples. As in tensor-parallel mode, the prompt and token ids never leave rank 0.

For one user generating one token at a time only one rank computes at any moment: the others wait for
their turn, so a token costs the sum of every rank's compute plus N hops, where tensor parallelism costs
1/N of the compute plus the allreduces. The layer math is models/llama.py's ShardedLayer (with the whole
layer, so no allreduce).
"""

from __future__ import annotations

import resource
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from tpi_mpi.engine import DTYPES, OP_FORWARD, OP_STOP, Master
from tpi_mpi.models.decoder_config import DecoderConfig, Rope
from tpi_mpi.models.linear import linear
from tpi_mpi.models.llama import ShardedLayer, rms_norm
from tpi_mpi.weights import quant
from tpi_mpi.weights.prefetch import ResidentBlocks, cast_block
from tpi_mpi.weights.shards import RankShard

POLL_S = 0.0002  # how often a rank waiting for its turn looks for the message (it sleeps in between)
TAG_HEADER, TAG_HIDDEN = 11, 12


def layer_ranges(num_layers: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) per rank, as equal as possible; the extra layers go to the last ranks,
    because rank 0 also holds the embedding and lm_head."""
    base, extra = divmod(num_layers, world_size)
    sizes = [base + (1 if r >= world_size - extra else 0) for r in range(world_size)]
    starts = np.cumsum([0, *sizes])
    return [(int(starts[r]), int(starts[r + 1])) for r in range(world_size)]


class Stage:
    """One rank's layers of the pipeline."""

    def __init__(self, comm: MPI.Comm, shard: RankShard, dtype: str = "auto"):
        t0 = time.perf_counter()
        self.comm = comm
        self.cfg = DecoderConfig.of(shard.config, shard.decoder)
        self.layer_range = layer_ranges(shard.num_layers, comm.size)[comm.rank]
        windows = self.cfg.windows
        first, end = self.layer_range
        self.blocks = ResidentBlocks({(i, k): shard.tensor_file(i, k) for i in range(first, end)
                                     for k in ("attn", "ffn")}, DTYPES[dtype])
        self.layers = {i: ShardedLayer.from_header(shard.tensor_file(i, "attn"), self.cfg, shard.plan.head_dim,
                                                   windows[i], DTYPES[dtype])
                       for i in range(first, end)}
        self.rotary = Rope(self.cfg)
        self.hidden_size = self.cfg.hidden_size
        self.header = np.zeros(4, dtype=np.int64)  # op, q_len, start, kv capacity (when start == 0)
        self.capacity = 0
        self.load_s = time.perf_counter() - t0
        self.compute_s = 0.0
        self.comm_s = 0.0  # sending, and receiving once the message is there (see _recv)
        self.wait_s = 0.0  # waiting for the previous stage: its compute, not communication
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def next_rank(self) -> int:
        return (self.comm.rank + 1) % self.comm.size

    @property
    def prev_rank(self) -> int:
        return (self.comm.rank - 1) % self.comm.size

    def _send(self, header: np.ndarray, x: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        self.comm.Send(header, dest=self.next_rank, tag=TAG_HEADER)
        if x is not None:
            self.comm.Send(x, dest=self.next_rank, tag=TAG_HIDDEN)
        self.comm_s += time.perf_counter() - t0
        self.bytes_sent += header.nbytes + (x.nbytes if x is not None else 0)

    def _recv(self, buf: np.ndarray, tag: int) -> None:
        t0 = time.perf_counter()
        # Polling with a short sleep instead of a blocking Recv: a rank waiting for its turn would
        # otherwise spin on a core the computing rank needs (many ranks share few cores here).
        status = MPI.Status()
        while not self.comm.Iprobe(source=self.prev_rank, tag=tag, status=status):
            time.sleep(POLL_S)
        t1 = time.perf_counter()
        self.comm.Recv(buf, source=self.prev_rank, tag=tag)
        t2 = time.perf_counter()
        self.wait_s += t1 - t0
        self.comm_s += t2 - t1
        self.bytes_received += buf.nbytes

    @torch.inference_mode()
    def run_layers(self, x: torch.Tensor, start: int, capacity: int) -> torch.Tensor:
        t0 = time.perf_counter()
        q_len = x.shape[0]
        if start == 0:
            self.capacity = capacity
            for layer in self.layers.values():
                layer.reset_cache(capacity)
        if start + q_len > self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} positions, asked for {start + q_len}")
        if self.layers:
            positions = torch.arange(start, start + q_len).unsqueeze(0)
            cos, sin = self.rotary(x.to(next(iter(self.layers.values())).dtype), positions)
            for i, layer in self.layers.items():  # the whole layer: nothing to allreduce
                with self.blocks.block(i, "attn") as a:
                    x = x + layer.attention(a, x.to(layer.dtype), start, cos, sin).float()
                with self.blocks.block(i, "ffn") as f:
                    x = x + layer.ffn(f, x.to(layer.dtype)).float()
        self.compute_s += time.perf_counter() - t0
        return x

    def rank_record(self) -> dict[str, Any]:
        return {
            "rank": self.comm.rank,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_s": self.load_s,
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "wait_s": self.wait_s,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "layers": list(self.layer_range),
        }


class PipelineWorker(Stage):
    def serve(self) -> None:
        """Receive hidden states from the previous rank, run the own layers, pass them on; until stop."""
        while True:
            self._recv(self.header, TAG_HEADER)
            op, q_len, start, capacity = (int(v) for v in self.header)
            if op == OP_STOP:
                if self.next_rank != 0:
                    self._send(self.header, None)
                return
            x = np.empty((q_len, self.hidden_size), dtype=np.float32)
            self._recv(x, TAG_HIDDEN)
            y = self.run_layers(torch.from_numpy(x), start, capacity)
            self._send(self.header, np.ascontiguousarray(y.numpy()))


class PipelineMaster(Stage):
    """Rank 0: embedding, its own layers, then the round trip through the other ranks, then the head."""

    def __init__(self, comm: MPI.Comm, shard: RankShard, dtype: str = "auto"):
        super().__init__(comm, shard, dtype)
        t0 = time.perf_counter()
        cast = DTYPES[dtype]
        self.embed = shard.master_file("embed.safetensors")["embed_tokens.weight"]
        head = shard.master_file("head.safetensors")
        self.norm = head["norm.weight"]
        # float, or packed when the split is quantized (which has a head of its own even when tied)
        self.lm_head = ({"lm_head.weight": self.embed} if not any(k.startswith("lm_head.") for k in head) else
                        quant.head_kernel_tensors(head) if shard.quant.quantized else head)
        if cast is not None:
            self.embed, self.norm = self.embed.to(cast), self.norm.to(cast)
            self.lm_head = cast_block(self.lm_head, cast)
        self.vocab_size = self.embed.shape[0]
        self.max_positions = self.cfg.max_position_embeddings
        self.eos_token_id = self.cfg.eos_token_id
        self.eps = self.cfg.rms_norm_eps
        self.load_s += time.perf_counter() - t0

    check_prompt = Master.check_prompt  # same checks, same messages

    @torch.inference_mode()
    def forward(self, ids: list[int], start: int, capacity: int = 0) -> torch.Tensor:
        """Logits (float32) of the last position."""
        t0 = time.perf_counter()
        x = F.embedding(torch.tensor(ids), self.embed).float()
        self.compute_s += time.perf_counter() - t0
        x = self.run_layers(x, start, capacity)
        if self.comm.size > 1:
            self.header[:] = (OP_FORWARD, len(ids), start, capacity)
            self._send(self.header, np.ascontiguousarray(x.numpy()))
            back = np.empty((len(ids), self.hidden_size), dtype=np.float32)
            self._recv(self.header, TAG_HEADER)
            self._recv(back, TAG_HIDDEN)
            x = torch.from_numpy(back)
        t1 = time.perf_counter()
        h = rms_norm(x[-1:].to(self.norm.dtype), self.norm, self.eps)
        logits = linear(h, self.lm_head, "lm_head").float()[0, :self.vocab_size]  # int4 rows are padded
        self.compute_s += time.perf_counter() - t1
        return logits

    def stop(self) -> None:
        if self.comm.size > 1:
            self.header[:] = (OP_STOP, 0, 0, 0)
            self._send(self.header, None)
