"""Shapes of models, devices and settings, and the prediction they give: the performance model's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tpi_mpi.comm.cost_model import LinkModel

FP32 = 4


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
    bytes_per_param: int = FP32

    @classmethod
    def from_hf_config(cls, c: dict[str, Any], bytes_per_param: int = FP32) -> ModelShape:
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return cls(c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                   c.get("num_key_value_heads") or c["num_attention_heads"], hd, c["num_hidden_layers"],
                   c["vocab_size"], bool(c.get("tie_word_embeddings", False)), bytes_per_param)

    @property
    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def layer_bytes(self) -> int:
        return self.layer_params * self.bytes_per_param

    @property
    def master_bytes(self) -> int:
        """Embedding, final norm and lm_head: rank 0 only."""
        return (self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden) * self.bytes_per_param

    @property
    def total_bytes(self) -> int:
        return self.layers * self.layer_bytes + self.master_bytes

    @property
    def attn_bytes(self) -> int:
        """One layer's attention block (q, k, v, o and its norm): the streamed unit with the FFN block."""
        return (2 * self.hidden * (self.heads + self.kv_heads) * self.head_dim + self.hidden) * self.bytes_per_param

    def window_bytes(self, window: int) -> int:
        """Bytes of the first `window` streamed blocks in forward order (attention, FFN, attention, ...)."""
        ffn = self.layer_bytes - self.attn_bytes
        blocks = [self.attn_bytes, ffn] * self.layers
        return sum(blocks[:window])

    def kv_bytes(self, tokens: int, n: int) -> float:
        return 2 * self.layers * self.kv_heads / n * self.head_dim * tokens * self.bytes_per_param


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


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    token_latency_s: float
    peak_bytes: float  # the largest device: rank 0
    peak_bytes_worker: float


