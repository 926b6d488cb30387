"""The inference protocol between the master (rank 0) and the workers.

Per forward pass the master broadcasts a small header (what to do, how many positions, from where)
and then the embedded hidden states; every rank runs its slice of every layer (ShardedDecoder); the
master alone holds the tokenizer and the embedding, so prompt text and token ids never leave it: workers
only ever see hidden states. With memory.head=split (the default) every rank then turns the last hidden
state into its vocabulary slice of the logits and the master gathers them and samples; a worker learns
nothing it could not compute from the hidden state it already has. With memory.head=master the master
alone holds lm_head and computes all the logits.

A pass may carry up to `max_batch` sequences (continuous batching, tpi_mpi/batching.py): the header then
lists, per sequence, its KV cache slot, first position, number of positions, the capacity to reserve when
it starts, and how many of its last positions' logits are wanted; their hidden states come stacked in one
broadcast. A worker still learns nothing but hidden states and where in which slot they go.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from tpi_mpi.comm.allreduce import CommStats, make_allreduce
from tpi_mpi.comm.links import SoftwareLinks
from tpi_mpi.comm.watchdog import Watchdog
from tpi_mpi.errors import UserError
from tpi_mpi.faults import fail_point
from tpi_mpi.models.head import LMHead, head_entries
from tpi_mpi.models.linear import kernel_name
from tpi_mpi.models.llama import ShardedDecoder, Span, norm
from tpi_mpi.weights import tensorfile
from tpi_mpi.weights.cgroup_memory import cgroup_memory_peak
from tpi_mpi.weights.memplan import HEAD_CHUNK_BYTES, MemoryPlan
from tpi_mpi.weights.prefetch import BlockSource, LayerPrefetcher, ResidentBlocks
from tpi_mpi.weights.process_memory import process_memory
from tpi_mpi.weights.shards import RankShard

# OP_IDLE: the sequence is over and the next header may be long in coming (a server between requests): the
# workers wait for it sleeping, unwatched. OP_REPORT: every rank sends rank 0 its counters (Engine.counters).
OP_STOP, OP_FORWARD, OP_IDLE, OP_REPORT = 0, 1, 2, 3
IDLE_POLL_S = 0.001  # how often an idle worker looks for the next header (adds up to this to a request's TTFT)
WARMUP_PASSES = 64  # peak RSS after this many forward passes is recorded: later growth would be a leak
DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESIDENT = MemoryPlan("resident", 0, (), True)
HEADER_FIXED, HEADER_PER_SEQ = 2, 5  # op, sequences; per sequence: slot, start, q_len, capacity, logit rows


@dataclass(frozen=True)
class Step:
    """One sequence's part of a forward pass (Master.forward_batch)."""

    slot: int  # its KV cache slot, 0..max_batch-1
    ids: list[int]  # the token ids of its positions start..start+len(ids)-1
    start: int
    capacity: int = 0  # when start == 0: the positions to reserve in its slot's KV cache
    rows: int = 1  # logits wanted for its last `rows` positions (0: a prefill chunk that is not the last)


@dataclass
class RankTimes:
    load_s: float = 0.0
    forward_s: float = 0.0  # wall time inside forward passes, communication included
    bcast: CommStats = field(default_factory=CommStats)
    gather: CommStats = field(default_factory=CommStats)  # the logits' slices (memory.head=split)


class Engine:
    """What every rank has: its decoder slice, the allreduce, and the broadcast from the master."""

    def __init__(self, comm: MPI.Comm, shard: RankShard, algo: str, dtype: str = "auto", wire: str = "fp32",
                 timeout_s: float | None = None, links: SoftwareLinks | None = None, plan: MemoryPlan = RESIDENT,
                 head: str = "split", max_batch: int = 1):
        """`plan` (memplan.plan_rank_memory): which blocks stay in memory, how many are streamed at once;
        `head` (memory.head): split lm_head by vocabulary over the ranks, or keep it on the master;
        `max_batch` (serve.max_batch): KV cache slots, the most sequences a forward pass carries."""
        t0 = time.perf_counter()
        self.comm = comm
        self.head_mode = head
        self.cast = DTYPES[dtype]
        self.allreduce = make_allreduce(algo, comm, wire, links)  # links: emulation.links=software
        self.watchdog = Watchdog(comm, timeout_s)  # a stalled collective aborts the job, naming it
        self.plan = plan
        files = shard.block_files()
        self.blocks: BlockSource = (ResidentBlocks(files, self.cast) if plan.mode == "resident" else
                                    LayerPrefetcher(files, list(plan.streamed), plan.window, self.cast))
        self.max_batch = max_batch
        self.decoder = ShardedDecoder(shard, self.allreduce, self.blocks, self.cast, self.watchdog, max_batch)
        fail_point("load", comm.rank)
        self.quant = shard.quant
        self.hidden_size = self.decoder.cfg.hidden_size
        self.eps = self.decoder.cfg.rms_norm_eps
        self.header = np.zeros(HEADER_FIXED + HEADER_PER_SEQ * max_batch, dtype=np.int64)
        if head == "split":
            slice_file = shard.master_tensor_file("head_slice.safetensors")
            self._load_head(slice_file, slice_file, "lm_head", shard.vocab_range[1] - shard.vocab_range[0])
            # Rank 0 places each rank's slice of the logits; the ranges are fixed by the split.
            self.vocab_ranges: list[tuple[int, int]] = comm.gather(shard.vocab_range, root=0) or []
        self.times = RankTimes(load_s=time.perf_counter() - t0)
        self.passes = 0
        self.rss_warm_bytes: tuple[int, int, int | None] | None = None  # process_memory() after WARMUP_PASSES passes
        self.bytes_read_load = self.blocks.stats.bytes_read  # what start-up read (the master adds its own)

    def _load_head(self, norm_file: Any, file: Any, name: str, rows: int) -> None:
        """The final norm, and lm_head (or this rank's rows of it): in memory if the plan keeps it there,
        else read in vocabulary chunks of HEAD_CHUNK_BYTES into reused buffers at every use (models/head.py)."""
        stats = self.blocks.stats
        self.norm, n = tensorfile.read_tensor(norm_file, "norm.weight")
        stats.add(bytes_read=n)
        self.head = LMHead(file, name, rows, self.plan.head_resident, self.cast, stats, HEAD_CHUNK_BYTES)
        if self.cast is not None:
            self.norm = self.norm.to(self.cast)

    def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and this rank's lm_head rows on positions `h` of the last layer's output."""
        return self.head.logits(norm(h.to(self.norm.dtype), self.norm, self.eps))

    def _split_logits(self, h: torch.Tensor) -> torch.Tensor | None:
        """memory.head=split: this rank's slice of the logits of positions `h`, gathered on rank 0 into the
        whole vocabulary (None on the others). One message per rank, one hop on a star."""
        rows = h.shape[0]
        part = np.ascontiguousarray(self._head_logits(h).numpy())
        t0 = time.perf_counter()
        s = self.times.gather
        full = None
        with self.watchdog("gather of the logits"):
            if self.comm.rank == 0:
                counts = [rows * (v1 - v0) for v0, v1 in self.vocab_ranges]
                displs = np.cumsum([0, *counts[:-1]]).tolist()
                flat = np.empty(sum(counts), dtype=np.float32)
                self.comm.Gatherv(part, [flat, counts, displs, MPI.FLOAT], root=0)
                full = torch.empty((rows, self.vocab_ranges[-1][1]), dtype=torch.float32)
                for (v0, v1), d in zip(self.vocab_ranges, displs, strict=True):
                    full[:, v0:v1] = torch.from_numpy(flat[d:d + rows * (v1 - v0)].reshape(rows, v1 - v0))
                s.bytes_received += flat.nbytes - part.nbytes
            else:
                self.comm.Gatherv(part, None, root=0)
                s.bytes_sent += part.nbytes
        s.calls += 1
        s.seconds += time.perf_counter() - t0
        return full

    def _pass_done(self) -> None:
        self.passes += 1
        if self.passes == 2:  # mid-generation: the prompt and one more token done
            fail_point("generate", self.comm.rank)
        if self.passes == WARMUP_PASSES:
            self.rss_warm_bytes = process_memory()

    def _bcast_hidden(self, x: np.ndarray) -> None:
        t0 = time.perf_counter()
        with self.watchdog("bcast of hidden states"):
            self.comm.Bcast(x, root=0)
        s = self.times.bcast
        s.calls += 1
        s.seconds += time.perf_counter() - t0
        n = x.nbytes * (self.comm.size - 1) if self.comm.rank == 0 else x.nbytes
        if self.comm.rank == 0:
            s.bytes_sent += n
        else:
            s.bytes_received += n

    def _header_spans(self) -> tuple[int, list[Span], list[int], list[int]]:
        """The header as (op, spans, capacities, logit rows)."""
        h = self.header.tolist()
        seqs = [h[HEADER_FIXED + HEADER_PER_SEQ * i:HEADER_FIXED + HEADER_PER_SEQ * (i + 1)] for i in range(h[1])]
        return h[0], [Span(*q[:3]) for q in seqs], [q[3] for q in seqs], [q[4] for q in seqs]

    def _layers(self, x: torch.Tensor, spans: list[Span], capacities: list[int]) -> torch.Tensor:
        for s, capacity in zip(spans, capacities, strict=True):
            if s.start == 0:
                self.decoder.reset(capacity, s.slot)
        return self.decoder.forward(x, 0, spans)

    @staticmethod
    def _wanted(x: torch.Tensor, spans: list[Span], rows: list[int]) -> torch.Tensor:
        """The hidden states whose logits are wanted: each sequence's last `rows` positions, stacked."""
        if len(spans) == 1:
            return x[x.shape[0] - rows[0]:]
        ends = np.cumsum([s.q_len for s in spans]).tolist()
        return torch.cat([x[e - r:e] for e, r in zip(ends, rows, strict=True)])

    def _pass(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's part of a forward pass after the hidden states' broadcast: the layers, then the
        logits of the wanted positions (on rank 0: all of them; elsewhere None), if any are wanted."""
        _, spans, capacities, rows = self._header_spans()
        y = self._layers(x, spans, capacities)
        if sum(rows) == 0:  # prefill chunks that are not the last: no logits
            return torch.empty((0, 0))
        h = self._wanted(y, spans, rows)
        if self.head_mode == "split":
            return self._split_logits(h)
        return self._head_logits(h) if self.comm.rank == 0 else None

    def weights_record(self) -> dict[str, Any]:
        """How the weights are stored and computed: the run record's `weights`, the summary line's weights=."""
        float_dtype = self.decoder.layers[0].dtype if self.decoder.layers else torch.float32
        dtype = str(float_dtype).removeprefix("torch.")
        short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, dtype)
        record = {**self.quant.to_json(), "float_dtype": short,
                  "label": self.quant.label if self.quant.quantized else short}
        kernel = kernel_name(self.quant, float_dtype)  # which matmul ran them (model.kernel)
        if kernel is not None:
            record["kernel"] = kernel
            if self.quant.format == "int4":
                record["int4_layout"] = self.quant.layout
        return record

    def close(self) -> None:
        """Stop the watchdog and the prefetcher's thread (both idempotent)."""
        self.watchdog.close()
        self.blocks.close()

    def counters(self) -> dict[str, Any]:
        """What a server reports per rank (OP_REPORT): seconds computing, communicating, waiting for the disk."""
        ar, bc, ga = self.allreduce.stats, self.times.bcast, self.times.gather
        comm_s = ar.seconds + bc.seconds + ga.seconds
        return {"rank": self.comm.rank, "compute_s": max(0.0, self.times.forward_s - comm_s), "comm_s": comm_s,
                "disk_wait_s": self.blocks.stats.disk_wait_s, "bytes_read": self.blocks.stats.bytes_read,
                "forward_passes": self.passes,
                "bytes_sent": ar.bytes_sent + bc.bytes_sent + ga.bytes_sent,
                "bytes_received": ar.bytes_received + bc.bytes_received + ga.bytes_received,
                "rss_bytes": process_memory()[1]}

    def _bcast_header(self, idle: bool, watch: bool = True) -> None:
        """The header from rank 0. After OP_IDLE it comes as a nonblocking broadcast that the workers poll,
        sleeping: a blocking one would spin every idle worker on its core. Rank 0 knows when it is that one."""
        if not idle:
            with self.watchdog("bcast of the header", watch=watch):
                self.comm.Bcast(self.header, root=0)
            return
        req = self.comm.Ibcast(self.header, root=0)
        if self.comm.rank == 0:
            with self.watchdog("bcast of the header"):
                req.Wait()
        else:
            with self.watchdog("bcast of the header", watch=False):
                while not req.Test():
                    time.sleep(IDLE_POLL_S)

    def rank_record(self) -> dict[str, Any]:
        ar, bc, ga = self.allreduce.stats, self.times.bcast, self.times.gather
        comm_s = ar.seconds + bc.seconds + ga.seconds
        choices = getattr(self.allreduce, "choices", None)  # comm.algo=auto: what it picked per size
        cgroup = cgroup_memory_peak()
        return {
            "rank": self.comm.rank,
            "peak_rss_bytes": process_memory()[0],
            "cgroup_peak_bytes": cgroup["peak_bytes"] if cgroup else None,
            "cgroup": cgroup["cgroup"] if cgroup else None,
            "disk_wait_s": self.blocks.stats.disk_wait_s,
            "bytes_read": self.blocks.stats.bytes_read,
            "bytes_read_load": self.bytes_read_load,
            "memory": {**self.plan.to_json(), **self.blocks.stats.to_json()},
            "load_s": self.times.load_s,
            "compute_s": max(0.0, self.times.forward_s - comm_s),
            "comm_s": comm_s,
            "bytes_sent": ar.bytes_sent + bc.bytes_sent + ga.bytes_sent,
            "bytes_received": ar.bytes_received + bc.bytes_received + ga.bytes_received,
            "allreduce": ar.to_json(),
            "bcast": bc.to_json(),
            "gather": ga.to_json(),
            "head": self.head_mode,
            # Memory after warm-up and now (null if fewer passes): later growth would be a leak.
            "peak_rss_warm_bytes": self.rss_warm_bytes[0] if self.rss_warm_bytes else None,
            "rss_warm_bytes": self.rss_warm_bytes[1] if self.rss_warm_bytes else None,
            "rss_bytes": process_memory()[1],
            "heap_warm_bytes": self.rss_warm_bytes[2] if self.rss_warm_bytes else None,
            "heap_bytes": process_memory()[2],
            "forward_passes": self.passes,
            # keys: bytes of the float32 message; wire: what went on the wire (comm.dtype, or its choice if auto)
            **({"allreduce_auto": {str(nbytes): {"algo": algo, "wire": wire, "predicted_s": t}
                                   for nbytes, (algo, wire, t) in choices.items()}} if choices is not None else {}),
        }


class Worker(Engine):
    def serve(self) -> None:
        """Run forward passes as the master asks, until it says stop."""
        # Not watched before the first pass (rank 0 may still be loading its tokenizer), nor after OP_IDLE.
        watch, idle = False, False
        while True:
            self._bcast_header(idle, watch)
            op = int(self.header[0])
            if op == OP_STOP:
                return
            if op == OP_IDLE:
                watch, idle = False, True
                continue
            if op == OP_REPORT:
                with self.watchdog("gather of the counters"):
                    self.comm.gather(self.counters(), root=0)
                continue
            watch, idle = True, False
            _, spans, _, _ = self._header_spans()
            x = np.empty((sum(s.q_len for s in spans), self.hidden_size), dtype=np.float32)
            t0 = time.perf_counter()
            self._bcast_hidden(x)
            with torch.inference_mode():
                self._pass(torch.from_numpy(x))
            self.times.forward_s += time.perf_counter() - t0
            self._pass_done()


class Master(Engine):
    """Rank 0: also embeds token ids and turns the last hidden state into logits."""

    def __init__(self, comm: MPI.Comm, shard: RankShard, algo: str, dtype: str = "auto", wire: str = "fp32",
                 timeout_s: float | None = None, links: SoftwareLinks | None = None, plan: MemoryPlan = RESIDENT,
                 head: str = "split", max_batch: int = 1):
        super().__init__(comm, shard, algo, dtype, wire, timeout_s, links, plan, head, max_batch)
        t0 = time.perf_counter()
        # Only the embedding rows of the ids being embedded are ever read (tensorfile.read_rows).
        self.embed_file = shard.master_tensor_file("embed.safetensors")
        self.vocab_size = self.embed_file.entries["embed_tokens.weight"].shape[0]
        if head == "master":
            head_file = shard.master_tensor_file("head.safetensors")
            # A quantized split holds a head of its own even when the float embedding is tied to it.
            tied = shard.tied_embeddings and not head_entries(head_file, "lm_head")
            self._load_head(head_file, *((self.embed_file, "embed_tokens") if tied else (head_file, "lm_head")),
                            self.vocab_size)
        self.bytes_read_load = self.blocks.stats.bytes_read
        self.max_positions = self.decoder.cfg.max_position_embeddings
        self.idle = False  # after end_sequence(): the workers poll for the next header (Engine._bcast_header)
        self.eos_token_id = self.decoder.cfg.eos_token_id
        self.times.load_s += time.perf_counter() - t0

    def forward(self, ids: list[int], start: int, capacity: int = 0, all_logits: bool = False) -> torch.Tensor:
        """One sequence in slot 0: logits (float32) of the last position, or of every position with all_logits."""
        logits = self.forward_batch([Step(0, ids, start, capacity, len(ids) if all_logits else 1)])[0]
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def forward_batch(self, steps: Sequence[Step]) -> list[torch.Tensor]:
        """One forward pass of up to max_batch sequences, each in its own slot: per step the logits (float32)
        of its last `rows` positions, [rows, vocab]."""
        slots = {s.slot for s in steps}
        if (not 1 <= len(steps) <= self.max_batch or len(slots) != len(steps)
                or not slots <= set(range(self.max_batch)) or not all(s.ids for s in steps)):
            raise ValueError(f"a pass carries 1..{self.max_batch} sequences, each with positions, in distinct slots "
                             f"0..{self.max_batch - 1}: got slots {[s.slot for s in steps]}")
        t0 = time.perf_counter()
        self._send(OP_FORWARD, steps)
        ids = [i for s in steps for i in s.ids]
        rows, n = tensorfile.read_rows(self.embed_file, "embed_tokens.weight", ids)
        self.blocks.stats.add(bytes_read=n)
        x = (rows.to(self.cast) if self.cast is not None else rows).float().contiguous()
        self._bcast_hidden(x.numpy())
        logits = self._pass(x)
        assert logits is not None
        self.times.forward_s += time.perf_counter() - t0
        self._pass_done()
        if logits.shape[0] == 0:
            return [torch.empty((0, self.vocab_size)) for _ in steps]
        return [logits] if len(steps) == 1 else list(torch.split(logits, [s.rows for s in steps]))

    def _send(self, op: int, steps: Sequence[Step] = ()) -> None:
        self.header[:] = 0
        self.header[:HEADER_FIXED] = (op, len(steps))
        for i, s in enumerate(steps):
            o = HEADER_FIXED + HEADER_PER_SEQ * i
            self.header[o:o + HEADER_PER_SEQ] = (s.slot, s.start, len(s.ids), s.capacity, s.rows)
        self._bcast_header(self.idle)
        self.idle = op == OP_IDLE or (self.idle and op == OP_REPORT)

    def stop(self) -> None:
        self._send(OP_STOP)

    def end_sequence(self) -> None:
        """The sequence is over and the next may be long in coming: the workers wait for it sleeping and
        unwatched. The KV cache stays as it is (a server's prompt cache)."""
        if not self.idle:
            self._send(OP_IDLE)

    def report(self) -> list[dict[str, Any]]:
        """Every rank's counters (Engine.counters), rank by rank; between passes of a sequence too."""
        self._send(OP_REPORT)
        with self.watchdog("gather of the counters"):
            report = self.comm.gather(self.counters(), root=0)
        assert report is not None  # rank 0
        return report

    def check_prompt(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if len(ids) > self.max_positions:
            raise UserError(
                f"the prompt has {len(ids)} tokens but the model has {self.max_positions} positions: "
                "shorten the prompt"
            )
