"""Which of a rank's weights stay in memory and how many streamed blocks it holds at once.

From memory.resident / window / budget (config.MemoryConfig), the block sizes (from the safetensors
headers, nothing read yet), the KV cache, an estimate of the activations, and a fixed overhead measured
now (the process's resident memory before any weight is loaded: interpreter, torch, MPI):

    resident=true   every block in memory
    resident=false  every block streamed through `window` buffers (default 2: one computing, one reading)
    resident=auto   everything in memory if it fits the budget; else the window (lowered to 1 if that is all
                    that fits) and, once the window is full size, with what is left as many blocks resident
                    as fit, largest reads first (master's lm_head, then FFN blocks, then attention blocks),
                    spread evenly over the layers so that the reader has resident blocks' compute time to get
                    ahead.

A server decoding several sequences at once (serve.max_batch) reserves a KV cache slot per sequence up
front: the plan counts them all, and refuses a max_batch that no plan fits into the budget, naming the
largest that fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from tpi_mpi.config import MemoryConfig
from tpi_mpi.errors import UserError
from tpi_mpi.weights.cgroup_memory import cgroup_memory_usage
from tpi_mpi.weights.prefetch import BlockKey
from tpi_mpi.weights.quant import check_model_dtype, out_features
from tpi_mpi.weights.tensorfile import READ_CHUNK_BYTES

DEFAULT_WINDOW = 2
# lm_head is streamed in vocabulary chunks of this many bytes when it is not resident.
HEAD_CHUNK_BYTES = 32 * 1024 * 1024
# Allocator slack, MPI buffers and torch temporaries beyond the estimate of activations.
SLACK_BYTES = 48 * 1024 * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    mode: str  # "resident" | "stream" | "partial"
    window: int  # streamed blocks in memory at once (0 when nothing is streamed)
    streamed: tuple[BlockKey, ...]  # in forward order
    head_resident: bool  # lm_head (or its vocabulary slice) kept in memory, else streamed in vocabulary chunks
    parts: dict[str, int] = field(default_factory=dict)  # predicted bytes by what they hold

    @property
    def predicted_bytes(self) -> int:
        return sum(self.parts.values())

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "window": self.window, "streamed_blocks": len(self.streamed),
                "head_resident": self.head_resident, "predicted_bytes": self.predicted_bytes,
                "parts": dict(self.parts)}


def _spread(keys: list[BlockKey], k: int) -> list[BlockKey]:
    """k of the keys, evenly spaced."""
    n = len(keys)
    return [keys[(i * n) // k] for i in range(k)] if k else []


def plan_memory(mem: MemoryConfig, blocks: dict[BlockKey, int], fixed: dict[str, int],
                head_bytes: int = 0) -> MemoryPlan:
    """`blocks`: bytes of each block in memory; `fixed`: what any plan needs (overhead, KV cache,
    activations); `head_bytes`: this rank's lm_head or its vocabulary slice (0 if it holds none)."""
    order = sorted(blocks)  # (layer, "attn") < (layer, "ffn"): forward order
    total = sum(blocks.values())
    head_stream = min(head_bytes, HEAD_CHUNK_BYTES)
    base = dict(fixed)
    if mem.resident is True:
        return MemoryPlan("resident", 0, (), True, {**base, "resident_blocks": total, "head": head_bytes})
    if mem.resident is False:
        window = mem.window or DEFAULT_WINDOW
        largest = max(blocks.values(), default=0)
        return MemoryPlan("stream", window, tuple(order), False,
                          {**base, "window": window * largest, "read_cache": READ_CHUNK_BYTES,
                           "head": head_stream})
    budget = mem.budget_bytes
    assert budget is not None  # validated in config
    if sum(base.values()) + total + head_bytes <= budget:
        return MemoryPlan("resident", 0, (), True, {**base, "resident_blocks": total, "head": head_bytes})
    largest = max(blocks.values(), default=0)
    # The stream's fixed cost: its buffers, one read chunk of page cache, and the head read in chunks.
    def stream_cost(w: int) -> int:
        return w * largest + READ_CHUNK_BYTES + head_stream
    smallest = smallest_budget(blocks, fixed, head_bytes)
    if budget < smallest:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in base.items())
        raise UserError(
            f"memory.budget={mem.budget} ({fmt_bytes(budget)}) is too small: the smallest workable budget is "
            f"{fmt_bytes(smallest)} ({smallest} bytes: one block of {fmt_bytes(largest)}, {parts}, "
            f"read cache {fmt_bytes(READ_CHUNK_BYTES)}, lm_head chunk {fmt_bytes(head_stream)}): "
            f"raise memory.budget to at least {smallest}")
    target = mem.window or DEFAULT_WINDOW
    window = target
    while window > 1 and sum(base.values()) + stream_cost(window) > budget:
        window -= 1
    # Memory goes to the window first; blocks become resident only once it is full size, so that neither
    # the window nor the resident blocks ever shrink as the budget grows.
    left = budget - sum(base.values()) - stream_cost(window) if window == target else 0
    head_resident = False
    if 0 < head_bytes and head_bytes - head_stream <= left:
        head_resident, left = True, left - (head_bytes - head_stream)
    resident: list[BlockKey] = []
    for kind in ("ffn", "attn"):
        keys = [k for k in order if k[1] == kind]
        size = max((blocks[k] for k in keys), default=0)
        fit = min(len(keys), left // size) if size else len(keys)
        resident += _spread(keys, int(fit))
        left -= sum(blocks[k] for k in _spread(keys, int(fit)))
    streamed = tuple(k for k in order if k not in set(resident))
    if not streamed:  # everything fits once the window is not needed
        return MemoryPlan("resident", 0, (), True, {**base, "resident_blocks": total, "head": head_bytes})
    resident_bytes = sum(blocks[k] for k in resident)
    return MemoryPlan("partial" if resident else "stream", window, streamed, head_resident,
                      {**base, "resident_blocks": resident_bytes, "window": window * largest,
                       "read_cache": READ_CHUNK_BYTES,
                       "head": head_bytes if head_resident else head_stream})


def smallest_budget(blocks: dict[BlockKey, int], fixed: dict[str, int], head_bytes: int = 0) -> int:
    """The least memory any plan needs: the fixed parts and a stream through a window of one block."""
    return (sum(fixed.values()) + max(blocks.values(), default=0) + READ_CHUNK_BYTES
            + min(head_bytes, HEAD_CHUNK_BYTES))


def _head_bytes(shard: Any, name: str, as_float: int) -> int:
    """A quantized head's bytes as stored; a float head's in the compute dtype (it is cast when loaded)."""
    if not shard.quant.quantized:
        return as_float
    entries = shard.master_tensor_file(name).entries
    return sum(e.nbytes for k, e in entries.items() if k.startswith("lm_head."))


def plan_rank_memory(shard: Any, mem: MemoryConfig, dtype: Any, is_master: bool, slots: int = 1,
                     pass_tokens: int | None = None) -> MemoryPlan:
    """The plan of this rank, from its shard's headers and its memory use now (the fixed overhead).

    With memory.head=split every rank holds its rows of lm_head (its vocabulary slice); with master only
    rank 0 holds lm_head, all of it. `slots` (serve.max_batch): KV cache slots of memory.kv_cache_tokens
    positions each; `pass_tokens`: the most positions one forward pass carries (default: a whole
    sequence's, a prompt prefilled in one pass)."""
    files = shard.block_files()
    if files:
        check_model_dtype(shard.quant, dtype, files[(0, "attn")].entries["input_norm.weight"].torch_dtype)
    if mem.resident is not True and not shard.quant.quantized:
        disk = {e.torch_dtype for tf in files.values() for e in tf.entries.values()}
        if dtype is not None and disk != {dtype}:
            raise UserError(f"memory.resident={str(mem.resident).lower()} streams weights as stored on disk "
                            f"({', '.join(sorted(str(d).removeprefix('torch.') for d in disk))}), model.dtype "
                            "asks for another: set model.dtype=auto, or split with --dtype")
    item = 4 if dtype is None else dtype.itemsize
    first = files[(0, "attn")].entries if files else {}
    if first and dtype is None:  # the compute dtype, that of the KV cache: the float tensors' (norms)
        item = first["input_norm.weight"].torch_dtype.itemsize
    cfg = shard.config
    kv_tokens = mem.kv_cache_tokens or cfg["max_position_embeddings"]
    hidden = cfg["hidden_size"]
    kv_cols = out_features(first, "k_proj") if first else 0
    q_cols = out_features(first, "q_proj") if first else 0
    ffn_cols = out_features(files[(0, "ffn")].entries, "gate_proj") if files else 0
    kv_slot = shard.num_layers * 2 * kv_cols * kv_tokens * item
    # fp32 residual stream and its copies, q/k/v, the FFN's three intermediates, per position (prefill).
    positions = min(pass_tokens or kv_tokens, kv_tokens + slots - 1)
    act = positions * 4 * (6 * hidden + 3 * ffn_cols + 2 * q_cols + 2 * kv_cols)
    # Per sequence of a batch: its KV cache slot and, on the master, the logits of its last position, their
    # softmax and sort when sampling.
    per_slot = kv_slot + (cfg["vocab_size"] * 4 * 3 if is_master else 0)
    head = 0
    if mem.head == "split":
        v0, v1 = shard.vocab_range
        head = _head_bytes(shard, "head_slice.safetensors", (v1 - v0) * hidden * item)
    elif is_master:
        head = _head_bytes(shard, "head.safetensors", cfg["vocab_size"] * hidden * item)
    # The overhead in the budget's own terms: against a cgroup's limit, what the cgroup is charged now (it
    # does not count library pages another process loaded first, which the RSS does).
    overhead = (cgroup_memory_usage() if mem.budget == "cgroup" else None) or current_rss_bytes()
    blocks = {k: tf.data_bytes for k, tf in files.items()}
    if slots > 1 and mem.resident == "auto":
        _check_slots(mem, slots, per_slot, blocks, {"overhead": overhead, "activations": act, "slack": SLACK_BYTES},
                     head)
    fixed = {"overhead": overhead, "kv_cache": slots * kv_slot, "activations": act + slots * (per_slot - kv_slot),
             "slack": SLACK_BYTES}
    return plan_memory(mem, blocks, fixed, head)


def _check_slots(mem: MemoryConfig, slots: int, per_slot: int, blocks: dict[BlockKey, int], fixed: dict[str, int],
                 head_bytes: int) -> None:
    """A max_batch whose KV cache slots no plan fits into memory.budget is refused, naming the largest that
    fits (if even one does not, plan_memory says how small the budget is)."""
    budget = mem.budget_bytes
    assert budget is not None  # resident=auto has one (config)
    rest = smallest_budget(blocks, fixed, head_bytes)
    if rest + slots * per_slot <= budget or rest + per_slot > budget:
        return
    fits = (budget - rest) // per_slot
    raise UserError(f"serve.max_batch={slots} does not fit memory.budget={mem.budget} ({fmt_bytes(budget)}): "
                    f"each sequence takes {fmt_bytes(per_slot)} (its KV cache of memory.kv_cache_tokens="
                    f"{mem.kv_cache_tokens} positions) on top of the {fmt_bytes(rest)} the smallest plan needs: "
                    f"the largest that fits is serve.max_batch={fits}")
