"""Tensor-parallel Llama-family decoder (Llama 2/3, Mistral, Qwen2) for one rank.

Each layer is two segments of compute, each ending in a named sync (an allreduce of the partial
outputs of a row-parallel projection):
    attention:  norm -> q/k/v of this rank's heads -> RoPE -> KV cache -> SDPA -> o_proj  [sync "attn"]
    ffn:        norm -> gate/up of this rank's columns -> SiLU * up -> down_proj        [sync "ffn"]
The residual stream is kept in float32 on every rank; every rank gets the same sum, so it stays in step.

A forward pass may carry several sequences (continuous batching, tpi_mpi/batching.py): their positions are
stacked into one [tokens, hidden] matrix, so every linear layer reads its weights once for all of them and
each allreduce carries them all; only attention is per sequence (`Span`: its KV cache slot, first position,
and number of positions), each on its own slot's cache, exactly as it would run alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from tpi_mpi.comm.watchdog import Watchdog
from tpi_mpi.kernels import native
from tpi_mpi.models.decoder_config import DecoderConfig, Rope, apply_rope
from tpi_mpi.models.linear import linear, linears, native_kernels
from tpi_mpi.weights.prefetch import BlockSource, Weights
from tpi_mpi.weights.quant import out_features
from tpi_mpi.weights.shards import RankShard
from tpi_mpi.weights.tensorfile import TensorFile

AllreduceFn = Callable[[np.ndarray], None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF's LlamaRMSNorm: normalise in float32, then scale in the weight's dtype."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(weight.dtype)


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm; for fp32 or fp16 rows at inference with our kernels in use, in one C call (kernels/step_ops.c)."""
    if _step_ops(x) and weight.dtype == x.dtype and x.dim() == 2:
        return native.rms_norm(x, weight, eps)
    return rms_norm(x, weight, eps)


def _step_ops(x: torch.Tensor) -> bool:
    """Whether the small ops of a step on x run in C (kernels/step_ops.c says why): fp32 or fp16, no autograd, and
    model.kernel choosing our kernels."""
    return x.dtype in native.STEP_DTYPES and not torch.is_grad_enabled() and native_kernels()


def attention_mask(q_len: int, start: int, kv_len: int, window: int | None) -> torch.Tensor | None:
    """Boolean mask (True = attend) for queries at positions start.., or None where SDPA needs none."""
    if q_len == 1 and (window is None or kv_len <= window):
        return None
    q_pos = torch.arange(start, start + q_len).unsqueeze(1)
    k_pos = torch.arange(kv_len).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos < window
    return mask


class Span(NamedTuple):
    """One sequence's positions in a forward pass: `q_len` rows of the stacked hidden states, at positions
    start..start+q_len-1 of KV cache slot `slot`."""

    slot: int
    start: int
    q_len: int


def positions_of(spans: Sequence[Span]) -> torch.Tensor:
    """[1, tokens]: the position of every stacked row (for RoPE)."""
    if len(spans) == 1:
        return torch.arange(spans[0].start, spans[0].start + spans[0].q_len).unsqueeze(0)
    return torch.cat([torch.arange(s.start, s.start + s.q_len) for s in spans]).unsqueeze(0)


class ShardedLayer:
    """One decoder layer: this rank's attention heads and FFN columns, with its part of the KV cache.

    The weights are not kept here: each call gets its block (`a`: attention, `f`: FFN) from the block
    source, which holds them in memory or streams them from disk (prefetch.py). The KV cache has `slots`
    slots, one per sequence of a batch, each of its own capacity."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, eps: float, window: int | None,
                 dtype: torch.dtype, slots: int = 1):
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.eps = eps
        self.window = window
        self.dtype = dtype
        self.k_cache: list[torch.Tensor | None] = [None] * slots
        self.v_cache: list[torch.Tensor | None] = [None] * slots

    @classmethod
    def from_header(cls, attn: TensorFile, cfg: Any, head_dim: int, window: int | None,
                    dtype: torch.dtype | None, slots: int = 1) -> ShardedLayer:
        """Shaped from the layer's attention block header (its heads), nothing of the weights read."""
        q, k = (out_features(attn.entries, f"{n}_proj") for n in ("q", "k"))
        return cls(q // head_dim, k // head_dim, head_dim, cfg.rms_norm_eps, window,
                   dtype or attn.entries["input_norm.weight"].torch_dtype, slots)

    def reset_cache(self, capacity: int, slot: int = 0) -> None:
        """A new sequence in `slot`. A slot's cache of the same capacity is kept, not reallocated: every
        position a sequence reads it has written first, so what an earlier sequence left there is never read."""
        shape = (1, self.n_kv, capacity, self.head_dim)
        k = self.k_cache[slot]
        if k is not None and k.shape == shape:
            return
        self.k_cache[slot] = self.v_cache[slot] = None  # the old one freed before the new one is taken
        self.k_cache[slot] = torch.zeros(shape, dtype=self.dtype)
        self.v_cache[slot] = torch.zeros(shape, dtype=self.dtype)

    def attention(self, a: Weights, x: torch.Tensor, start: int, cos: torch.Tensor,
                  sin: torch.Tensor, spans: Sequence[Span] | None = None) -> torch.Tensor:
        """x: [tokens, hidden] in the layer's dtype; one sequence at `start` in slot 0, or the stacked
        sequences of `spans`. cos/sin: RoPE of every row's position (positions_of)."""
        hd, q_len = self.head_dim, x.shape[0]
        h = norm(x, a["input_norm.weight"], self.eps)
        q, k, v = linears(h, a, ("q_proj", "k_proj", "v_proj"))
        spans = spans or [Span(0, start, q_len)]
        if all(s.q_len == 1 for s in spans) and _step_ops(q):  # decoding: every sequence at one position
            return linear(self._attend_ones(q, k, v, cos, sin, spans), a, "o_proj")
        q = q.view(1, q_len, self.n_heads, hd).transpose(1, 2)
        k = k.view(1, q_len, self.n_kv, hd).transpose(1, 2)
        v = v.view(1, q_len, self.n_kv, hd).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)  # elementwise per row: the same as for each alone
        if len(spans) == 1:
            out = self._attend(q, k, v, spans[0])
        else:
            outs, o = [], 0
            for s in spans:
                outs.append(self._attend(q[:, :, o:o + s.q_len], k[:, :, o:o + s.q_len], v[:, :, o:o + s.q_len], s))
                o += s.q_len
            out = torch.cat(outs)
        return linear(out, a, "o_proj")

    def _attend_ones(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     spans: Sequence[Span]) -> torch.Tensor:
        """As apply_rope and _attend for sequences of one position each (row i of q/k/v, cos/sin: spans[i]),
        each in one C call: [sequences, heads * head_dim]."""
        outs = []
        for i, s in enumerate(spans):
            k_cache, v_cache = self.k_cache[s.slot], self.v_cache[s.slot]
            assert k_cache is not None and v_cache is not None, "reset_cache first"
            first = 0 if self.window is None else max(0, s.start - self.window + 1)
            outs.append(native.attention_one(q[i].contiguous(), k[i].contiguous(), v[i].contiguous(),
                                             cos[0, i].contiguous(), sin[0, i].contiguous(), k_cache, v_cache,
                                             s.start, first, self.head_dim**-0.5))
        return torch.stack(outs)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Span) -> torch.Tensor:
        """One sequence's attention over its own slot: [q_len, heads * head_dim]."""
        k_cache, v_cache = self.k_cache[s.slot], self.v_cache[s.slot]
        assert k_cache is not None and v_cache is not None, "reset_cache first"
        end = s.start + s.q_len
        k_cache[:, :, s.start:end] = k
        v_cache[:, :, s.start:end] = v
        keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
        mask = attention_mask(s.q_len, s.start, end, self.window)
        causal = mask is not None and s.start == 0 and self.window is None
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=None if causal else mask, is_causal=causal,
            scale=self.head_dim**-0.5, enable_gqa=self.n_heads != self.n_kv,
        )
        return out.transpose(1, 2).reshape(s.q_len, self.n_heads * self.head_dim)

    def ffn(self, f: Weights, x: torch.Tensor) -> torch.Tensor:
        h = norm(x, f["post_norm.weight"], self.eps)
        gate, up = linears(h, f, ("gate_proj", "up_proj"))
        return linear(F.silu(gate) * up, f, "down_proj")


class ShardedDecoder:
    """All layers of one rank. forward() is called by every rank with the same hidden states."""

    def __init__(self, shard: RankShard, allreduce: AllreduceFn, blocks: BlockSource,
                 dtype: torch.dtype | None = None, watchdog: Watchdog | None = None, slots: int = 1):
        """`blocks`: where each layer's weights come from (prefetch.ResidentBlocks / LayerPrefetcher);
        `dtype`: the compute dtype the blocks are cast to (None: as on disk); `slots`: KV cache slots, the
        most sequences one forward pass carries."""
        self.cfg = DecoderConfig.of(shard.config, shard.decoder)
        self.allreduce = allreduce
        self.blocks = blocks
        self.watchdog = watchdog or Watchdog(None, None)  # names the allreduce that stalls
        self.layers = [ShardedLayer.from_header(shard.tensor_file(i, "attn"), self.cfg, shard.plan.head_dim,
                                                self.cfg.windows[i], dtype, slots)
                       for i in range(shard.num_layers)]
        self.rotary = Rope(self.cfg)
        self.capacity = [0] * slots  # per slot

    def reset(self, capacity: int, slot: int = 0) -> None:
        """A new sequence in `slot`: its KV cache reserved up front for `capacity` positions."""
        self.capacity[slot] = capacity
        for layer in self.layers:
            layer.reset_cache(capacity, slot)

    def _sync(self, partial: torch.Tensor, layer: int, part: str) -> torch.Tensor:
        buf = partial.float().contiguous()
        with self.watchdog("allreduce", layer, part):
            self.allreduce(buf.numpy())
        return buf

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, start: int, spans: Sequence[Span] | None = None) -> torch.Tensor:
        """x: float32 [q_len, hidden] at positions start..start+q_len-1 of slot 0, or the stacked sequences
        of `spans` (start unused then); returns the same shape."""
        spans = spans or [Span(0, start, x.shape[0])]
        for s in spans:
            if s.start + s.q_len > self.capacity[s.slot]:
                raise RuntimeError(f"KV cache slot {s.slot} holds {self.capacity[s.slot]} positions, asked for "
                                   f"{s.start + s.q_len}")
        dtype = self.layers[0].dtype if self.layers else torch.float32
        cos, sin = self.rotary(x.to(dtype), positions_of(spans))
        for i, layer in enumerate(self.layers):
            # A block is handed back as soon as its compute is done: the next read overlaps the allreduce.
            with self.blocks.block(i, "attn") as a:
                partial = layer.attention(a, x.to(layer.dtype), 0, cos, sin, spans)
            x = x + self._sync(partial, i, "attn")
            with self.blocks.block(i, "ffn") as f:
                partial = layer.ffn(f, x.to(layer.dtype))
            x = x + self._sync(partial, i, "ffn")
        return x
