"""Shapes of models, devices and settings, and the prediction they give: the performance model's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tpi_mpi.comm.cost_model import FP32_WIRE, LinkModel, WireCost

FP32 = 4
FLOAT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class WeightFormat:
    """How the linear weights (q, k, v, o, gate, up, down and lm_head) are stored, as torch's kernels take them:
    a float dtype, int8 with one bf16 scale per output row (`_weight_int8pack_mm`), or int4 with a bf16 scale
    and zero per group of `group_size` input columns (`_weight_int4pack_mm_for_cpu`). Norms and the embedding
    stay in the checkpoint's float dtype (ModelShape.float_bytes)."""

    name: str = "fp32"  # fp32 | fp16 | bf16 | int8 | int4
    group_size: int | None = None  # int4 only

    @property
    def key(self) -> str:
        """fp32, fp16, bf16, int8, int4-g64: how calibrations and tables name the format."""
        return f"int4-g{self.group_size}" if self.name == "int4" else self.name

    def matrix_bytes(self, out_features: int, in_features: int) -> float:
        """Bytes of one [out, in] weight matrix, its scales included."""
        weights = out_features * in_features
        if self.name == "int8":
            return weights + 2 * out_features
        if self.name == "int4":
            assert self.group_size is not None
            return weights / 2 + 4 * out_features * in_features / self.group_size
        return weights * FLOAT_BYTES[self.name]

    def bytes_per_weight(self, in_features: int = 4096) -> float:
        return self.matrix_bytes(1024, in_features) / (1024 * in_features)


DEFAULT_INT4_GROUP = 64  # the split's default group size (weights/formats.py on the quantization branch)


def weight_format(key: str) -> WeightFormat:
    """fp32, fp16, bf16, int8, int4 (default group size) or int4-gG."""
    if key in ("fp32", "fp16", "bf16", "int8"):
        return WeightFormat(key)
    if key == "int4":
        return WeightFormat("int4", DEFAULT_INT4_GROUP)
    if key.startswith("int4-g") and key[6:].isdigit():
        return WeightFormat("int4", int(key[6:]))
    raise ValueError(f"unknown weight format {key!r}: fp32, fp16, bf16, int8, int4 or int4-gG (G = 32, 64, 128)")


FP32_WEIGHTS = WeightFormat("fp32")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool = False
    weights: WeightFormat = FP32_WEIGHTS  # the linear weights
    float_bytes: int = FP32  # norms, the embedding, the KV cache

    @classmethod
    def from_hf_config(cls, c: dict[str, Any], weights: WeightFormat = FP32_WEIGHTS,
                       float_bytes: int = FP32) -> ModelShape:
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                   c.get("num_key_value_heads") or c["num_attention_heads"], hd, c["num_hidden_layers"],
                   c["vocab_size"], bool(c.get("tie_word_embeddings", False)), weights, float_bytes)

    def with_format(self, key: str) -> ModelShape:
        """The same model with its linear weights in format `key`; norms and embedding in fp32 for fp32, else
        fp16 (a half-precision checkpoint, as Llama 2 is released, quantized or not)."""
        fmt = weight_format(key)
        return replace(self, weights=fmt, float_bytes=FLOAT_BYTES.get(fmt.name, 2))

    @property
    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def attn_bytes(self) -> float:
        """One layer's attention block (q, k, v, o and its norm): the streamed unit with the FFN block."""
        h, q, kv, w = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.weights
        return 2 * w.matrix_bytes(q, h) + 2 * w.matrix_bytes(kv, h) + h * self.float_bytes

    @property
    def ffn_bytes(self) -> float:
        """One layer's FFN block (gate, up, down and its norm)."""
        h, f, w = self.hidden, self.ffn, self.weights
        return 2 * w.matrix_bytes(f, h) + w.matrix_bytes(h, f) + h * self.float_bytes

    @property
    def layer_bytes(self) -> float:
        return self.attn_bytes + self.ffn_bytes

    @property
    def head_bytes(self) -> float:
        """lm_head (quantized with the other linear weights; tied: the embedding itself, in float)."""
        if self.tied:
            return float(self.vocab * self.hidden * self.float_bytes)
        return self.weights.matrix_bytes(self.vocab, self.hidden)

    @property
    def master_bytes(self) -> float:
        """Embedding, final norm and lm_head: rank 0 only."""
        embedding = 0 if self.tied else self.vocab * self.hidden * self.float_bytes
        return embedding + self.head_bytes + self.hidden * self.float_bytes

    @property
    def total_bytes(self) -> float:
        return self.layers * self.layer_bytes + self.master_bytes

    def window_bytes(self, window: int) -> float:
        """Bytes of the first `window` streamed blocks in forward order (attention, FFN, attention, ...)."""
        blocks = [self.attn_bytes, self.ffn_bytes] * self.layers
        return sum(blocks[:window])

    def kv_bytes(self, tokens: int, n: int) -> float:
        return 2 * self.layers * self.kv_heads / n * self.head_dim * tokens * self.float_bytes


@dataclass(frozen=True)
class FixedCost:
    """What a forward pass costs beyond moving the weights, measured with the real code on a model of negligible
    size (hidden 128) with two layer counts: per pass (broadcast, embedding, head, sampling, the protocol) and
    per layer (Python, kernel launches, the layer's 2 allreduces, waits for the slowest rank), for a decode
    step (1 token) and a prefill (the prompt); both include what N ranks sharing the host's cores cost."""

    pass_token_s: float
    layer_token_s: float
    pass_prefill_s: float
    layer_prefill_s: float
    probe_hidden: int = 128  # the allreduce messages the measurement already paid for

    def forward(self, layers: int, prefill: bool) -> float:
        if prefill:
            return self.pass_prefill_s + layers * self.layer_prefill_s
        return self.pass_token_s + layers * self.layer_token_s


@dataclass(frozen=True)
class Device:
    """What one device (one rank, one torch thread here) can do. `host_cores`: the ranks share a host with
    that many cores (this machine), so when more ranks compute at once than there are cores each gets its
    share of a core; None: every rank is a device of its own."""

    flops: float  # FLOP/s of matrix products (prefill)
    weight_bw: float  # bytes/s of weights through a matrix-vector product (decode)
    layer_overhead_s: float  # fixed cost per layer per forward pass (our decoder: Python, kernel starts, syncs)
    disk_bw: float  # bytes/s reading layer files (cold: the memory scheduler evicts what it has used)
    base_rss: float  # bytes of a worker process before any weight is loaded
    base_rss_master: float  # the same for rank 0 (also Hydra, the tokenizer)
    host_cores: int | None = None
    offload_bw: float | None = None  # bytes/s Accelerate reads its offloaded weights (None: disk_bw)
    forward_overhead_s: float = 0.0  # fixed cost per forward pass (embedding, head, sampling, protocol)
    hf_layer_overhead_s: float | None = None  # the same for HF transformers' modules (None: as ours)
    hf_forward_overhead_s: float | None = None
    # Measured on this host (None: not calibrated, the formulas above apply):
    # fixed costs of real runs on a model of negligible size, per world size: "N" -> impl/algo -> FixedCost
    fixed: dict[int, dict[str, FixedCost]] | None = None
    # how much longer a matrix-vector product takes while all N ranks compute at once ("all") or while the
    # other N-1 ranks wait in MPI ("wait"), against one process alone: N -> factor
    stretch_all: dict[int, float] | None = None
    stretch_wait: dict[int, float] | None = None
    # aggregate cold read bandwidth of k processes reading at once from one disk: k -> bytes/s
    disk_bw_readers: dict[int, float] | None = None
    # per weight format (WeightFormat.key): bytes/s of its weights through its matrix-vector kernel (decode),
    # and its kernel's FLOP/s on a prompt relative to fp32's (prefill); formats not here run as fp32 does
    weight_bw_formats: dict[str, float] | None = None
    prefill_speed_formats: dict[str, float] | None = None

    def weight_bw_for(self, fmt: WeightFormat) -> float:
        return (self.weight_bw_formats or {}).get(fmt.key, self.weight_bw)

    def flops_for(self, fmt: WeightFormat) -> float:
        return self.flops * (self.prefill_speed_formats or {}).get(fmt.key, 1.0)


@dataclass(frozen=True)
class Setting:
    shape: ModelShape
    n: int
    prompt_tokens: int = 16
    new_tokens: int = 16
    algo: str = "star"
    window: int | None = None  # layers in memory per rank when streaming; None = all resident
    links: dict[str, LinkModel] = field(default_factory=dict)  # per algorithm; "bcast" and "p2p" too
    emulated: LinkModel | None = None  # emulation.links=software: the modelled links, on top of `links`
    head: str = "master"  # memory.head: "master" (rank 0 holds and computes lm_head) or "split" (by vocabulary)
    # memory.budget per rank (memory.resident=auto): what does not fit is streamed through the window
    budget: float | None = None
    wire: WireCost = FP32_WIRE  # comm.dtype's bytes per value and encode/decode costs (cost_model.WireCost)
    wire_choice: dict[str, WireCost] | None = None  # algo=auto with comm.dtype=auto: the wires it picks from


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    token_latency_s: float
    peak_bytes: float  # the largest device: rank 0
    peak_bytes_worker: float
    streamed_bytes: float = 0.0  # weight bytes the busiest rank reads from disk per token (streaming, budget)


