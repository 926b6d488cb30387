"""Performance model: TTFT, token latency and peak memory per device, from the model's shapes, N, window,
links, disk and compute, each calibrated by a short measurement on the machine at hand.

    python -m tpi_mpi.perfmodel calibrate --out calib.json      # ~3 min here: see `calibrate`
    python -m tpi_mpi.perfmodel paper --calibration calib.json  # the paper's settings, next to its numbers

One forward pass of q tokens (q = prompt: TTFT; q = 1: a token) through L layers on N tensor-parallel ranks:

    T = P(N) + L * [ s(N) * max(2 q P_l / N / F,  B_l / N / W)          weights through one core
                     + o(N)                                             fixed cost per layer
                     + 2 * s(N) * (AR(q h 4 bytes) - AR(q h_p 4 bytes))  bigger messages than the probe's
                     + 2 * AR_emulated(q h 4 bytes) ]                   software-modelled links, if any
          + s_w(N) * V h 4 / W                                          rank 0's lm_head, the others wait
    streamed layers (memory.window): the L layer terms become max(them, L B_l / D(N)), minus, for the
    prompt, the first `window` blocks, which the prefetcher read at start-up

    P(N), o(N)  fixed cost per pass and per layer (prefill and decode each): measured by real runs of
                `tpi_mpi.run` with a model of negligible size (hidden h_p = 128) of 1 and of 4 layers at
                N = 1, 2, 4, 8, for every allreduce algorithm; linear in N between them. They hold what
                N ranks on C cores cost beyond the arithmetic: Python, kernel starts, the allreduces of small
                messages, MPICH's waiting ranks polling on the cores the others compute on, context switches
    s(N)        how much longer a rank's matrix-vector products take while all N ranks compute at once on
                this host (measured by the link probe: 1 up to N = C cores, then about N / C)
    s_w(N)      the same while the other N - 1 ranks wait in MPI (a pipeline stage, rank 0's head)
    F, W        FLOP/s of our decoder layers' prefill (whole layers, 8 distinct ones in turn so that the weights
                come from memory, as in a forward pass), bytes/s of weights through a matrix-vector product
    AR          alpha-beta fits of each allreduce (cost_model.py), alpha at N, beta at N = 2
    D(N)        aggregate cold read bandwidth of N processes reading at once from the one disk here
    P_l, B_l    parameters and bytes of one layer; V the vocabulary

On real devices (the paper's settings) there is no sharing: s = s_w = 1, P and o as measured on one process,
allreduces over the paper's links, a disk per device (D = N x its bandwidth). Without a fixed-cost calibration
(old calibration files) the per-layer cost is share(N) * (weights + o) + 2 AR with share = N / C.

Peak memory per device = the process's base RSS (Python, torch, MPI) + resident weights (all of the rank's
slices, or `window` layers' blocks when streaming) + rank 0's embedding and lm_head + the KV cache.

Baselines: `transformers` and `accelerate` are one process: their fixed costs measured as above (accelerate
with everything offloaded, as under the sweeps' budget) + the weights through one core; accelerate's offloaded
weights come back from the page cache here (nothing evicts them), so they cost what resident ones do;
`pipeline` runs the stages one after another, each with a core to itself (waiting stages sleep between looks
for their message): whole layers as one process computes them + the pass cost measured by real runs of
baseline=pipeline on the probe model (every stage's own pass and the N hops).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .cost_model import CANDIDATES, LinkModel
from .cost_model import predict as allreduce_time

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


def _share(dev: Device, active: int) -> float:
    """How many ranks share each core while `active` ranks compute at once."""
    return max(1.0, active / dev.host_cores) if dev.host_cores else 1.0


def _compute(shape: ModelShape, q: int, n: int, dev: Device, active: int) -> float:
    """One layer's slice of 1/n of the work on one rank, while `active` ranks compute at once on the host."""
    share = _share(dev, active)
    flops = 2 * q * shape.layer_params / n
    # CPU time, overheads included, stretched by the number of ranks per core
    return share * (max(flops / dev.flops, shape.layer_bytes / n / dev.weight_bw) + dev.layer_overhead_s)


def _link(s: Setting, name: str) -> LinkModel:
    return s.links.get(name) or s.links.get("default") or LinkModel(0.0, 0.0)


def _head(shape: ModelShape, dev: Device) -> float:
    return shape.vocab * shape.hidden * shape.bytes_per_param / dev.weight_bw  # rank 0 alone


def _head_time(s: Setting, dev: Device, stretch: float, stretch_wait: float) -> float:
    """lm_head of the last token: rank 0 alone while the others wait (memory.head=master), or every rank its
    vocab/N rows at once, then rank 0 gathers the logits (split: one more hop, (N-1) slices of vocab/N floats)."""
    if s.head != "split" or s.n < 2:
        return stretch_wait * _head(s.shape, dev)
    b = _link(s, "bcast")
    gather = b.alpha + (s.n - 1) * (s.shape.vocab / s.n * FP32) * b.beta
    return stretch * _head(s.shape, dev) / s.n + gather


def per_pair_time(algo: str, n: int, nbytes: int, link: LinkModel) -> float:
    """An allreduce over links modelled per pair of ranks (tpi_mpi/links.py, emulation.links=software):
    messages to different peers do not queue behind each other, those on one link do."""
    if n <= 1 or nbytes == 0:
        return 0.0
    hop = link.alpha + nbytes * link.beta
    if algo == "star":
        return 2 * hop
    if algo == "ring":
        return 2 * (n - 1) * (link.alpha + nbytes / n * link.beta)
    if algo == "mesh":
        return hop
    if algo == "tree":
        from .cost_model import tree_rounds

        return tree_rounds(n) * hop
    return 2 * hop  # mpi: not modelled by the software links (they apply to our algorithms only)


def _allreduce_fit(s: Setting, nbytes: int) -> float:
    """One allreduce through the calibrated links (alpha-beta fits of the probe)."""
    link = _link(s, s.algo)
    if s.algo in CANDIDATES:
        return allreduce_time(s.algo, s.n, nbytes, link)
    return link.alpha + nbytes * link.beta if s.n > 1 else 0.0  # mpi: fitted as one alpha + m beta


def _allreduce_emulated(s: Setting, nbytes: int) -> float:
    """What the software links (emulation.links=software) add to one allreduce."""
    if s.emulated is None or s.algo == "mpi":
        return 0.0
    return per_pair_time(s.algo, s.n, nbytes, s.emulated)


def _allreduce(s: Setting, nbytes: int) -> float:
    return _allreduce_fit(s, nbytes) + _allreduce_emulated(s, nbytes)


def _bcast(s: Setting, nbytes: int) -> float:
    b = _link(s, "bcast")
    return (b.alpha + (s.n - 1) * nbytes * b.beta) if s.n > 1 else 0.0


def interpolate(table: dict[int, float] | None, n: int, default: float) -> float:
    """A quantity measured at some world sizes, at world size n: linear between the two nearest measured
    sizes, the nearest one outside them; `default` where nothing was measured."""
    if not table:
        return default
    sizes = sorted(table)
    if n <= sizes[0]:
        return table[sizes[0]]
    if n >= sizes[-1]:
        return table[sizes[-1]]
    lo = max(k for k in sizes if k <= n)
    hi = min(k for k in sizes if k >= n)
    return table[lo] if hi == lo else table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)


def fixed_cost(dev: Device, n: int, key: str) -> tuple[FixedCost, bool] | None:
    """The fixed costs of `key` ("tp:ALGO", "transformers", "accelerate") at world size n, interpolated
    between the measured world sizes (tp:star where ALGO was not measured), and whether they were measured
    with N > 1 (then they already include the allreduces of the probe's small messages)."""
    if not dev.fixed:
        return None
    per_n = {k: v[key] for k, v in dev.fixed.items() if key in v}
    if not per_n and key.startswith("tp:"):
        per_n = {k: v["tp:star"] for k, v in dev.fixed.items() if "tp:star" in v}
    if not per_n:
        return None
    if n > 1 and any(k > 1 for k in per_n):  # N = 1 has no communication: not one of the points for N > 1
        per_n = {k: v for k, v in per_n.items() if k > 1}

    def at_n(name: str) -> float:
        return interpolate({k: getattr(v, name) for k, v in per_n.items()}, n, 0.0)

    fc = FixedCost(at_n("pass_token_s"), at_n("layer_token_s"), at_n("pass_prefill_s"), at_n("layer_prefill_s"),
                   probe_hidden=next(iter(per_n.values())).probe_hidden)
    return fc, min(per_n) > 1 and n > 1


def _weights_time(shape: ModelShape, q: int, n: int, dev: Device) -> float:
    """One layer's slice of 1/n of the work on one rank with a core of its own."""
    return max(2 * q * shape.layer_params / n / dev.flops, shape.layer_bytes / n / dev.weight_bw)


def _stream_read(shape: ModelShape, n: int, dev: Device) -> float:
    """One layer's 1/n read from disk by each of the n ranks at once (they share the one disk here)."""
    if dev.disk_bw_readers and dev.host_cores:
        return shape.layer_bytes / interpolate(dev.disk_bw_readers, n, dev.disk_bw)
    return shape.layer_bytes / n / dev.disk_bw


def _tp_forward(s: Setting, dev: Device, q: int) -> float:
    sh, n = s.shape, s.n
    msg = q * sh.hidden * FP32
    measured = fixed_cost(dev, n, "tp:" + s.algo)
    if measured is None:  # not calibrated: a fixed cost per layer, stretched by the ranks per core
        per_layer = _compute(sh, q, n, dev, n) + 2 * _allreduce(s, msg)
        if s.window is not None:  # streaming: the disk reads overlap compute and communication
            per_layer = max(per_layer, _stream_read(sh, n, dev))
        return _bcast(s, msg) + sh.layers * per_layer + _head_time(s, dev, _share(dev, n), 1.0) + dev.forward_overhead_s
    fixed, paid = measured
    probe = q * fixed.probe_hidden * FP32 if paid else 0  # the messages the fixed costs already include
    stretch = interpolate(dev.stretch_all, n, _share(dev, n))
    # the bytes beyond the probe's: CPU work (copies, sums) too, so stretched like the products
    more_bytes = stretch * max(0.0, _allreduce_fit(s, msg) - _allreduce_fit(s, probe))
    per_layer = (stretch * _weights_time(sh, q, n, dev) + fixed.forward(1, q > 1) - fixed.forward(0, q > 1)
                 + 2 * (more_bytes + _allreduce_emulated(s, msg)))
    layers = sh.layers * per_layer
    if s.window is not None:  # streaming: the disk reads overlap compute and communication
        read = sh.layers * _stream_read(sh, n, dev)
        if q > 1:  # the prompt: the prefetcher filled the window at start-up, before the clock started
            read *= 1 - sh.window_bytes(s.window) / (sh.layers * sh.layer_bytes)
        layers = max(layers, read)
    head = _head_time(s, dev, stretch, interpolate(dev.stretch_wait, n, 1.0))
    more_bcast = stretch * max(0.0, _bcast(s, msg) - _bcast(s, probe))
    return fixed.forward(0, q > 1) + more_bcast + layers + head


def _one_process_forward(s: Setting, dev: Device, q: int, key: str) -> float | None:
    """HF transformers or Accelerate on one process, where their fixed costs were measured."""
    measured = fixed_cost(dev, 1, key)
    if measured is None:
        return None
    sh = s.shape
    return measured[0].forward(sh.layers, q > 1) + sh.layers * _weights_time(sh, q, 1, dev) + _head(sh, dev)


def _hf_device(dev: Device) -> Device:
    """HF transformers runs its own modules: their fixed costs where calibrated."""
    return replace(dev, layer_overhead_s=dev.hf_layer_overhead_s if dev.hf_layer_overhead_s is not None
                   else dev.layer_overhead_s,
                   forward_overhead_s=dev.hf_forward_overhead_s if dev.hf_forward_overhead_s is not None
                   else dev.forward_overhead_s)


def _peak(s: Setting, dev: Device) -> tuple[float, float]:
    sh, n = s.shape, s.n
    layers_held = sh.layers if s.window is None else min(s.window, sh.layers)
    worker = dev.base_rss + layers_held * sh.layer_bytes / n + sh.kv_bytes(s.prompt_tokens + s.new_tokens, n)
    master_only = sh.master_bytes
    if s.head == "split" and n > 1:  # every rank holds vocab/N rows of lm_head; rank 0 still the embedding
        head_bytes = sh.vocab * sh.hidden * sh.bytes_per_param
        worker += head_bytes / n
        master_only -= head_bytes if not sh.tied else 0
    return worker - dev.base_rss + dev.base_rss_master + master_only, worker


def predict_tp(s: Setting, dev: Device) -> Prediction:
    master, worker = _peak(s, dev)
    return Prediction(_tp_forward(s, dev, s.prompt_tokens), _tp_forward(s, dev, 1), master, worker)


def predict_transformers(s: Setting, dev: Device, memory: float | None = None) -> Prediction:
    """HF on one device. With `memory` (the device's RAM) smaller than the model, the weights that do not fit
    are evicted and read again from disk every forward pass (mmap'd safetensors under memory pressure)."""
    one = replace(s, n=1, window=None)
    dev = _hf_device(dev)
    master, _ = _peak(one, dev)
    reread = max(0.0, master - memory) / dev.disk_bw if memory else 0.0
    ttft, tok = (_one_process_forward(one, dev, s.prompt_tokens, "transformers"),
                 _one_process_forward(one, dev, 1, "transformers"))
    if ttft is None or tok is None:
        ttft, tok = _tp_forward(one, dev, s.prompt_tokens), _tp_forward(one, dev, 1)
    return Prediction(ttft + reread, tok + reread, master, master)


def predict_accelerate(s: Setting, dev: Device, max_memory: float, resident_bytes: float | None = None,
                       transient_bytes: float | None = None) -> Prediction:
    """HF with what does not fit `max_memory` read from disk each forward pass (Accelerate's disk offload).
    resident_bytes: what Accelerate's device_map kept in memory, where known (it places whole modules, so
    often less than the budget); transient_bytes: the most it holds of an offloaded module at once (one
    weight: its hooks load them one at a time); default: the budget, and one layer."""
    sh = s.shape
    resident = min(float(sh.total_bytes), max_memory) if resident_bytes is None else resident_bytes
    transient = sh.layer_bytes if transient_bytes is None else transient_bytes
    peak = dev.base_rss_master + resident + transient + sh.kv_bytes(s.prompt_tokens + s.new_tokens, 1)
    one = replace(s, n=1, window=None)
    ttft, tok = (_one_process_forward(one, dev, s.prompt_tokens, "accelerate"),
                 _one_process_forward(one, dev, 1, "accelerate"))
    if ttft is not None and tok is not None:
        # Calibrated: its hooks' fixed costs measured with everything offloaded; the offloaded weights come
        # back through the page cache (nothing evicts them on this host), read once by the product itself
        return Prediction(ttft, tok, peak, peak)
    base = predict_transformers(s, dev)
    read = (sh.total_bytes - resident) / (dev.offload_bw or dev.disk_bw)
    return Prediction(base.ttft_s + read, base.token_latency_s + read, peak, peak)


def predict_pipeline(s: Setting, dev: Device) -> Prediction:
    """One rank computes at a time: a stage has a core to itself (the ranks waiting for their turn sleep
    between looks for their message, pipeline.POLL_S, rather than spin in MPI), and each of the N hops
    costs the message plus, on average, half a look's interval before the next stage sees it."""
    from .pipeline import POLL_S

    sh, n = s.shape, s.n

    measured = fixed_cost(dev, 1, "tp:star")
    stages = fixed_cost(dev, n, "pipeline") if n > 1 else None

    def forward(q: int) -> float:
        # one hop per stage; "relay": measured passing a message around all N ranks while the others poll
        hop = s.links.get("relay") or _link(s, "p2p")
        msg = q * sh.hidden * FP32
        if stages is not None:  # calibrated: the probe's passes hold every stage's pass cost and the hops
            probe = q * stages[0].probe_hidden * FP32
            return (stages[0].forward(sh.layers, q > 1) + sh.layers * _weights_time(sh, q, 1, dev) + _head(sh, dev)
                    + n * max(0, msg - probe) * hop.beta)
        hops = n * (hop.alpha + msg * hop.beta + POLL_S / 2) if n > 1 else 0.0
        if measured is None:
            per_layer_full = _compute(sh, q, 1, dev, 1)  # whole layers, one rank at a time
            return sh.layers * per_layer_full + hops + _head(sh, dev) + dev.forward_overhead_s
        # a stage is our decoder on one process (the fixed costs measured at N = 1)
        stage = (measured[0].forward(sh.layers, q > 1) + sh.layers * _weights_time(sh, q, 1, dev)
                 + _head(sh, dev))
        return stage + hops

    layers_rank = -(-sh.layers // n)
    kv = sh.kv_bytes(s.prompt_tokens + s.new_tokens, 1) * layers_rank / sh.layers
    worker = dev.base_rss + layers_rank * sh.layer_bytes + kv
    master = worker - dev.base_rss + dev.base_rss_master + sh.master_bytes
    return Prediction(forward(s.prompt_tokens), forward(1), master, worker)


# ---------------------------------------------------------------------------------------------- calibration

def _median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_compute(threads: int) -> dict[str, float]:
    """With `threads` torch threads: FLOP/s of our decoder layers' prefill (16 tokens), bytes/s of weights
    through matrix-vector products (decode), and the fixed cost of one decoder layer (tiny shapes)."""
    import torch

    torch.set_num_threads(threads)
    h, f, q = 2048, 5504, 16
    ws = [torch.randn(f, h) for _ in range(4)]  # 4 x 45 MB: weights come from memory, not cache
    v = torch.randn(1, h)
    t = _median_time(lambda: [torch.nn.functional.linear(v, m) for m in ws], 15)
    weight_bw = 4 * f * h * FP32 / t
    overhead = _median_time(_layer_forward(64, 128, 4, 4, 16, distinct=1, q=1), 200)
    # Prefill: whole layers (norms, RoPE, attention and SiLU with the products), a 4-way slice of a
    # 2048-wide layer (46 MB), 8 distinct ones in turn as in a forward pass: one layer's weights alone would
    # stay in this host's L3 cache (260 MB here) and run ~15 % faster than a forward pass does.
    layer_s = _median_time(_layer_forward(h, f // 4, 4, 2, 128, distinct=8, q=q), 24)
    params = h * (4 + 2 + 2 + 4) * 128 + 3 * h * f // 4
    flops = 2 * q * params / max(layer_s - overhead, 1e-9)
    return {"flops": flops, "weight_bw": weight_bw, "layer_overhead_s": overhead}


def _layer_forward(h: int, f: int, heads: int, kv_heads: int, head_dim: int, distinct: int, q: int) -> Any:
    """A function running one decoder layer (ShardedLayer: attention then FFN) on q tokens, each call the
    next of `distinct` layers of these shapes (random weights)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from .models.llama import ShardedLayer, hf_config

    def block() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        attn = {"input_norm.weight": torch.ones(h), "q_proj.weight": torch.randn(heads * head_dim, h),
                "k_proj.weight": torch.randn(kv_heads * head_dim, h),
                "v_proj.weight": torch.randn(kv_heads * head_dim, h),
                "o_proj.weight": torch.randn(h, heads * head_dim)}
        ffn = {"post_norm.weight": torch.ones(h), "gate_proj.weight": torch.randn(f, h),
               "up_proj.weight": torch.randn(f, h), "down_proj.weight": torch.randn(h, f)}
        return attn, ffn

    blocks = [block() for _ in range(distinct)]
    cfg = hf_config({"model_type": "llama", "hidden_size": heads * head_dim, "intermediate_size": f,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 1,
                     "vocab_size": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 64})
    layer = ShardedLayer(n_heads=heads, n_kv=kv_heads, head_dim=head_dim, eps=1e-5, window=None,
                         dtype=torch.float32)
    layer.reset_cache(64)  # every call writes the same positions: no reset needed inside the timed call
    xs = torch.randn(q, h)
    start = 0 if q > 1 else 3
    cos, sin = LlamaRotaryEmbedding(cfg)(xs, torch.arange(start, start + q)[None])
    turn = [0]

    def run() -> None:
        attn, ffn = blocks[turn[0] % distinct]
        turn[0] += 1
        with torch.inference_mode():
            y = xs + layer.attention(attn, xs, start, cos, sin)
            y + layer.ffn(ffn, y)

    return run


def measure_overheads(workdir: Path, tokens: int = 24) -> dict[str, float]:
    """Fixed costs of a forward pass and of each layer, for our decoder and for HF transformers: decode
    latency of the real code on one process (one thread) with 1 and with 4 layers of negligible size
    (hidden 64); the difference over 3 layers is the per-layer cost, the rest the per-forward cost."""
    import torch
    from mpi4py import MPI
    from transformers import AutoModelForCausalLM

    from .baselines import HFRunner
    from .engine import Master
    from .make_model import make_model
    from .shards import open_rank_shard
    from .split import split

    torch.set_num_threads(1)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
    decode: dict[str, dict[int, float]] = {"ours": {}, "hf": {}}
    for layers in (1, 4):
        model = make_model(workdir / f"m{layers}", "tiny", "llama", layers=layers, overrides=shape)
        shard = open_rank_shard(split(model, workdir / f"s{layers}", 1), 0, 1)
        runners: dict[str, Any] = {"ours": Master(MPI.COMM_SELF, shard, "star"),
                   "hf": HFRunner(MPI.COMM_SELF, AutoModelForCausalLM.from_pretrained(model).eval(), 0.0, "hf")}
        for name, r in runners.items():
            times = []
            r.forward([1, 2, 3, 4], 0, 4 + tokens)
            for i in range(tokens):
                t0 = time.perf_counter()
                r.forward([5], 4 + i)
                times.append(time.perf_counter() - t0)
            decode[name][layers] = sorted(times)[len(times) // 2]
    out = {}
    for name, t in decode.items():
        per_layer = max(0.0, (t[4] - t[1]) / 3)
        out[f"{name}_layer_overhead_s"] = per_layer
        out[f"{name}_forward_overhead_s"] = max(0.0, t[1] - per_layer)
    return out


def measure_disk(size: int = 256 << 20) -> tuple[float, float]:
    """Bytes/s reading a fresh file whose pages were evicted from the page cache (our own file only), and
    reading it again from the page cache."""
    with tempfile.NamedTemporaryFile(dir=".", prefix=".perfmodel-disk-") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        speeds = []
        for _ in range(2):  # cold, then warm
            t0 = time.perf_counter()
            with open(f.name, "rb", buffering=0) as r:
                while r.read(1 << 24):
                    pass
            speeds.append(size / (time.perf_counter() - t0))
        return speeds[0], speeds[1]


def launcher(mpirun: str | list[str]) -> list[str]:
    """The mpirun command and its own options (e.g. ["mpirun", "-bind-to", "core"])."""
    return [mpirun] if isinstance(mpirun, str) else list(mpirun)


def bound_mpirun(mpirun: str, bind_to: str) -> list[str]:
    """mpirun with `-bind-to BIND_TO` (MPICH's Hydra), or without it for "none"."""
    return [mpirun, *(["-bind-to", bind_to] if bind_to != "none" else [])]


def run_mpirun(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run one mpirun in its own process group; on timeout kill the group (mpirun and every rank), then raise."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ...") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def measure_disk_readers(readers: tuple[int, ...] = (1, 2, 4, 8), size: int = 256 << 20) -> dict[int, float]:
    """Aggregate bytes/s of k threads reading at once, each its own cold file (evicted with POSIX_FADV_DONTNEED,
    our own files only): the streamed layers of N ranks are read by N processes at once from one disk. The
    same bytes in all: max(readers) files of size / max(readers); k readers share them out."""
    files = max(readers)
    chunk = size // files
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory(dir=".", prefix=".perfmodel-disk-") as d:
        paths = [Path(d) / f"f{i}" for i in range(files)]
        block = os.urandom(1 << 20)
        for path in paths:
            with open(path, "wb") as f:
                for _ in range(max(1, chunk >> 20)):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())

        def evict() -> None:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

        def read(mine: list[Path]) -> None:
            for path in mine:
                with open(path, "rb", buffering=0) as r:
                    while r.read(1 << 22):
                        pass

        import threading

        total = sum(p.stat().st_size for p in paths)
        for k in readers:
            evict()
            threads = [threading.Thread(target=read, args=(paths[i::k],)) for i in range(k)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[k] = total / (time.perf_counter() - t0)
    return out


def measure_fixed_costs(mpirun: str | list[str], workdir: Path, world_sizes: tuple[int, ...] = (1, 2, 4, 8),
                        layers: tuple[int, int] = (1, 4), repeats: int = 7, prompt_tokens: int = 16,
                        new_tokens: int = 16, timeout: float = 300) -> dict[str, Any]:
    """Real runs (`mpirun -n N python -m tpi_mpi.run`, one torch thread per rank, as the sweeps) of models of
    negligible size (hidden 128, 8 KV heads) with two layer counts: at N = 1 our decoder, HF transformers and
    Accelerate (everything offloaded), at N > 1 every allreduce algorithm. Returns the median TTFT and token
    latency p50 per world size, implementation and layer count."""
    from .make_model import make_model

    shape = {"hidden_size": PROBE_HIDDEN, "intermediate_size": 2 * PROBE_HIDDEN, "num_attention_heads": 8,
             "num_key_value_heads": 8}
    models = [make_model(workdir / f"fixed-l{n}", "tiny", "llama", layers=n, overrides=shape) for n in layers]
    ids = ",".join(str(3 + i) for i in range(prompt_tokens))
    raw: dict[str, Any] = {}
    for n in world_sizes:
        results = workdir / f"fixed-n{n}.jsonl"
        sweep = (["baseline=null,transformers,accelerate", "accelerate.max_memory=1KB",
                  f"accelerate.offload_folder={workdir / 'offload'}"] if n == 1 else [f"comm={','.join(ALGOS)}"])
        runs = [(models, sweep)]
        if 1 < n <= layers[-1]:  # baseline=pipeline needs a layer per rank: the deeper model only
            runs.append((models[-1:], ["baseline=pipeline"]))
        print(f"calibrating fixed costs: {n} rank(s) ...", file=sys.stderr, flush=True)
        for k, (run_models, run_sweep) in enumerate(runs):
            cmd = [*launcher(mpirun), "-n", str(n), sys.executable, "-m", "tpi_mpi.run", "-m",
                   f"model.path={','.join(str(m) for m in run_models)}", f"model.cache_dir={workdir / 'shards'}",
                   f"prompt_ids=[{ids}]", f"generation.max_new_tokens={new_tokens}", "generation.stop_on_eos=false",
                   "logging.quiet=true", f"output.results={results}", "output.json=null", "threads=1",
                   *run_sweep, f"generation.seed={','.join(str(i + 1) for i in range(repeats))}",
                   f"hydra.sweep.dir={workdir / f'hydra-n{n}-{k}'}"]
            out = run_mpirun(cmd, timeout)
            if out.returncode != 0 or not results.is_file():
                raise RuntimeError(f"fixed-cost runs on {n} ranks failed:\n{out.stderr[-2000:]}")
        from .results import read_jsonl

        points: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in read_jsonl(results):
            key = r.get("baseline") or f"tp:{r['comm_algo']}"
            n_layers = json.loads((Path(r["config"]["model"]["path"]) / "config.json").read_text())["num_hidden_layers"]
            points.setdefault((key, n_layers), []).append(r)
        per_n: dict[str, Any] = {}
        for (key, n_layers), recs in sorted(points.items()):
            ttft = sorted(r["ttft_s"] for r in recs)
            tok = sorted(r["token_latency_s"]["p50"] for r in recs)
            per_n.setdefault(key, {})[str(n_layers)] = {"ttft_s": ttft[len(ttft) // 2],
                                                        "token_s": tok[len(tok) // 2]}
        raw[str(n)] = per_n
    return {"probe_hidden": PROBE_HIDDEN, "prompt_tokens": prompt_tokens, "raw": raw}


def fit_fixed_costs(measured: dict[str, Any]) -> dict[int, dict[str, FixedCost]]:
    """Per layer = the difference between the two layer counts over the layers added; per pass = the rest
    (both at least 0: noise can make the difference negative). baseline=pipeline, measured with one layer
    count: its layers cost what our decoder's do on one process, its pass (N stages' own pass costs and the
    N hops) the rest."""
    out: dict[int, dict[str, FixedCost]] = {}
    pipeline: dict[int, tuple[int, dict[str, float]]] = {}
    for n, per_key in measured["raw"].items():
        for key, by_layers in per_key.items():
            if key == "pipeline":
                pipeline[int(n)] = next((int(k), v) for k, v in by_layers.items())
                continue
            (l1, t1), (l2, t2) = sorted((int(k), v) for k, v in by_layers.items())[:2]
            layer_tok = max(0.0, (t2["token_s"] - t1["token_s"]) / (l2 - l1))
            layer_pre = max(0.0, (t2["ttft_s"] - t1["ttft_s"]) / (l2 - l1))
            out.setdefault(int(n), {})[key] = FixedCost(
                pass_token_s=max(0.0, t1["token_s"] - l1 * layer_tok), layer_token_s=layer_tok,
                pass_prefill_s=max(0.0, t1["ttft_s"] - l1 * layer_pre), layer_prefill_s=layer_pre,
                probe_hidden=int(measured.get("probe_hidden", PROBE_HIDDEN)))
    one = out.get(1, {}).get("tp:star")
    for n, (layers, t) in pipeline.items():
        if one is not None:
            out.setdefault(n, {})["pipeline"] = FixedCost(
                pass_token_s=max(0.0, t["token_s"] - layers * one.layer_token_s), layer_token_s=one.layer_token_s,
                pass_prefill_s=max(0.0, t["ttft_s"] - layers * one.layer_prefill_s),
                layer_prefill_s=one.layer_prefill_s, probe_hidden=one.probe_hidden)
    return out


ALGOS = ("star", "ring", "mesh", "tree", "mpi")
PROBE_HIDDEN = 128  # hidden size of the fixed-cost probe's models: its layers cost next to nothing


def _probe_links_rank(hidden: int, repeats: int) -> None:
    """Under mpirun: time every allreduce algorithm on one and on 16 tokens' hidden states, and the
    broadcast and one point-to-point hop; rank 0 prints one JSON line of median seconds."""
    import numpy as np
    from mpi4py import MPI

    from . import engine  # noqa: F401  (what a rank imports: torch, transformers' Llama, ...)
    from .allreduce import make_allreduce

    comm = MPI.COMM_WORLD
    if comm.rank == 0:  # rank 0 also runs Hydra and the tokenizer
        import hydra  # noqa: F401
        from transformers import AutoTokenizer  # noqa: F401
    rss = comm.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, root=0)
    result: dict[str, Any] = {"base_rss": rss, **_probe_stretch(comm)}
    for q in (1, 16):
        buf = np.ones(q * hidden, dtype=np.float32)
        for algo in ALGOS:
            ar = make_allreduce(algo, comm)
            times = []
            for _ in range(repeats):
                comm.Barrier()
                t0 = time.perf_counter()
                ar(buf)
                times.append(time.perf_counter() - t0)
            result.setdefault(algo, {})[str(buf.nbytes)] = float(np.median(times))
        times = []
        for _ in range(repeats):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Bcast(buf, root=0)
            times.append(time.perf_counter() - t0)
        result.setdefault("bcast", {})[str(buf.nbytes)] = float(np.median(times))
        times = []
        for _ in range(repeats):  # one hop, rank 0 -> 1, timed at the receiver after a barrier
            comm.Barrier()
            t0 = time.perf_counter()
            if comm.rank == 0:
                comm.Send(buf, dest=1)
            elif comm.rank == 1:
                comm.Recv(buf, source=0)
            times.append(time.perf_counter() - t0)
        result.setdefault("p2p", {})[str(buf.nbytes)] = float(np.median(comm.bcast(times, root=1)))
        times = []
        for _ in range(repeats):  # around all ranks, 0 -> 1 -> ... -> N-1 -> 0, as pipeline stages hand on
            comm.Barrier()
            t0 = time.perf_counter()
            if comm.rank == 0:
                comm.Send(buf, dest=1)
                comm.Recv(buf, source=comm.size - 1)
            else:
                comm.Recv(buf, source=comm.rank - 1)
                comm.Send(buf, dest=(comm.rank + 1) % comm.size)
            times.append(time.perf_counter() - t0)
        result.setdefault("relay", {})[str(buf.nbytes)] = float(np.median(comm.bcast(times, root=0)))
    if comm.rank == 0:
        print("PROBE " + json.dumps(result), flush=True)


def _probe_stretch(comm: Any, repeats: int = 5) -> dict[str, float]:
    """Seconds of the matrix-vector products of measure_compute (4 x 45 MB, one thread) while every rank runs
    them at once ("all": tensor parallelism) and while rank 0 runs them and the others wait in MPI ("wait":
    a pipeline stage; MPICH's waiting ranks poll). all: the slowest rank's median, as an allreduce waits."""
    import torch

    torch.set_num_threads(1)
    h, f = 2048, 5504
    ws = [torch.randn(f, h) for _ in range(4)]
    v = torch.randn(1, h)

    def products() -> float:
        t0 = time.perf_counter()
        for m in ws:
            torch.nn.functional.linear(v, m)
        return time.perf_counter() - t0

    products()  # warm-up
    every = []
    for _ in range(repeats):
        comm.Barrier()
        every.append(products())
    slowest = max(comm.allgather(sorted(every)[len(every) // 2]))
    alone = []
    for _ in range(repeats):
        comm.Barrier()
        if comm.rank == 0:
            alone.append(products())
        comm.Barrier()  # the others wait here, polling
    wait = comm.bcast(sorted(alone)[len(alone) // 2] if comm.rank == 0 else None, root=0)
    return {"products_bytes": float(4 * f * h * FP32), "products_all_s": slowest, "products_wait_s": wait}


def fit_link(points: dict[str, float], algo: str, n: int) -> LinkModel:
    """alpha and beta of the cost model from two message sizes (gamma folded into beta)."""
    from .cost_model import predict

    (m1, t1), (m2, t2) = sorted((int(k), v) for k, v in points.items())
    unit = LinkModel(1.0, 0.0)
    per_byte = LinkModel(0.0, 1.0)
    if algo in ("bcast", "p2p", "mpi"):  # one message per step, whatever N: alpha + m beta
        a_coef, b_coef = 1.0, float(n - 1 if algo == "bcast" else 1)
    elif algo == "relay":  # N hops one after another: N (alpha + m beta)
        a_coef, b_coef = float(n), float(n)
    else:
        a_coef, b_coef = predict(algo, n, 1, unit), predict(algo, n, 1, per_byte)
    beta = max(0.0, (t2 - t1) / ((m2 - m1) * b_coef))
    alpha = max(0.0, (t1 - beta * b_coef * m1) / a_coef)
    return LinkModel(alpha, beta)


def calibrate(mpirun: str | list[str], world_sizes: tuple[int, ...] = (2, 4, 8), hidden: int = 1024,
              repeats: int = 20, fixed_costs: bool = True) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0))
    t0 = time.time()
    calib: dict[str, Any] = {"cores": cores, "loadavg_before": os.getloadavg()}
    calib["compute_all_cores"] = measure_compute(cores)
    calib["compute_1_thread"] = measure_compute(1)
    calib["disk_bw"], calib["disk_bw_warm"] = measure_disk()
    with tempfile.TemporaryDirectory(prefix="perfmodel-") as d:
        calib["overheads"] = measure_overheads(Path(d))
    calib["disk_bw_readers"] = {str(k): v for k, v in measure_disk_readers((1, *world_sizes)).items()}
    links: dict[str, dict[str, Any]] = {}
    stretch: dict[str, dict[str, float]] = {"all": {"1": 1.0}, "wait": {"1": 1.0}}
    for n in world_sizes:
        out = run_mpirun([*launcher(mpirun), "-n", str(n), sys.executable, "-m", "tpi_mpi.perfmodel", "probe-links",
                          "--hidden", str(hidden), "--repeats", str(repeats)], 300)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")), None)
        if line is None:
            raise RuntimeError(f"link probe on {n} ranks failed:\n{out.stderr[-2000:]}")
        raw = json.loads(line[6:])
        rss = raw.pop("base_rss")
        calib["base_rss_master"], calib["base_rss"] = float(rss[0]), float(max(rss[1:]))
        # one process alone would take products_bytes / weight_bw (measure_compute, same products)
        alone = raw.pop("products_bytes") / calib["compute_1_thread"]["weight_bw"]
        stretch["all"][str(n)] = max(1.0, raw.pop("products_all_s") / alone)
        stretch["wait"][str(n)] = max(1.0, raw.pop("products_wait_s") / alone)
        links[str(n)] = {"raw_s": raw, **{k: asdict(fit_link(v, k, n)) for k, v in raw.items()}}
    calib["links"] = links
    calib["stretch"] = stretch
    if fixed_costs:
        with tempfile.TemporaryDirectory(prefix="perfmodel-fixed-") as d:
            calib["fixed_costs"] = measure_fixed_costs(mpirun, Path(d), (1, *world_sizes))
    calib["seconds"] = time.time() - t0
    calib["loadavg_after"] = os.getloadavg()
    return calib


def device_from(calib: dict[str, Any]) -> Device:
    """A rank of the sweeps: one torch thread (experiments.run_all runs them with threads=1)."""
    c = calib["compute_1_thread"]
    o = calib.get("overheads", {})
    return Device(flops=c["flops"], weight_bw=c["weight_bw"],
                  layer_overhead_s=o.get("ours_layer_overhead_s", c["layer_overhead_s"]),
                  forward_overhead_s=o.get("ours_forward_overhead_s", 0.0),
                  hf_layer_overhead_s=o.get("hf_layer_overhead_s"),
                  hf_forward_overhead_s=o.get("hf_forward_overhead_s"),
                  disk_bw=calib["disk_bw"], base_rss=calib["base_rss"], base_rss_master=calib["base_rss_master"],
                  host_cores=calib["cores"],
                  # Accelerate's offloaded weights stay in the page cache here (nothing evicts them)
                  offload_bw=calib.get("disk_bw_warm"),
                  fixed=fit_fixed_costs(calib["fixed_costs"]) if "fixed_costs" in calib else None,
                  stretch_all=_int_keys(calib.get("stretch", {}).get("all")),
                  stretch_wait=_int_keys(calib.get("stretch", {}).get("wait")),
                  disk_bw_readers=_int_keys(calib.get("disk_bw_readers")))


def _int_keys(table: dict[str, float] | None) -> dict[int, float] | None:
    return {int(k): float(v) for k, v in table.items()} if table else None


def links_from(calib: dict[str, Any], n: int, beta_from_smallest: bool = False) -> dict[str, LinkModel]:
    """The link fits measured at world size n (the nearest measured one). beta_from_smallest: the cost per byte
    from the smallest world size measured, where each rank has a core (oversubscribed ranks make the two-size
    fit of beta noise; the fixed-cost model stretches the per-byte cost itself)."""
    sizes = sorted(int(k) for k in calib["links"])
    if not sizes or n < 2:
        return {}
    near = min(sizes, key=lambda s: (abs(s - n), s))
    fits = {k: LinkModel(**v) for k, v in calib["links"][str(near)].items() if k != "raw_s"}
    if beta_from_smallest:
        small = {k: LinkModel(**v) for k, v in calib["links"][str(sizes[0])].items() if k != "raw_s"}
        fits = {k: replace(v, beta=small[k].beta) if k in small and k != "relay" else v for k, v in fits.items()}
    return fits


def _device_map_bytes(model: Path, device_map: dict[str, str] | None) -> tuple[float | None, float | None]:
    """Bytes of the checkpoint's tensors Accelerate kept in memory, and its largest offloaded tensor."""
    if not device_map:
        return None, None
    from safetensors import safe_open

    resident, largest = 0.0, 0.0
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                nbytes = float(FP32 * math.prod(sl.get_shape()))
                where = next((v for k, v in sorted(device_map.items(), key=lambda kv: -len(kv[0]))
                              if k == "" or name == k or name.startswith(k + ".")), "cpu")
                if where == "disk":
                    largest = max(largest, nbytes)
                else:
                    resident += nbytes
    return resident, largest


def predict_record(record: dict[str, Any], calib: dict[str, Any]) -> Prediction:
    """What the model predicts for a measured run record (its model, N, baseline, algorithm, lengths)."""
    cfg = record["config"]
    shape = ModelShape.from_hf_config(json.loads((Path(cfg["model"]["path"]) / "config.json").read_text()))
    n = record["world_size"]
    algo = cfg["comm"]["algo"]
    mem = cfg.get("memory", {})
    window = mem.get("window") if mem.get("resident") is False else None
    emulated = None
    if (cfg.get("emulation") or {}).get("links") == "software" and cfg.get("network"):
        link = cfg["network"]["default"]  # the network=NAME profile as the run resolved it
        emulated = LinkModel(link["latency_s"], 8 / link["bandwidth_bit_s"])
    head = str(mem.get("head") or "master")  # absent in records from before the split: master
    s = Setting(shape, n, record["prompt_tokens"], record["generated_tokens"], algo,
                window=window if window is None else int(window),
                links=links_from(calib, n, beta_from_smallest="fixed_costs" in calib), emulated=emulated,
                head=head)
    dev = device_from(calib)
    baseline = record.get("baseline")
    if baseline == "transformers":
        return predict_transformers(s, dev)
    if baseline == "accelerate":
        from .config import size_bytes

        cap = cfg["accelerate"]["max_memory"]
        resident, transient = _device_map_bytes(Path(cfg["model"]["path"]), record["ranks"][0].get("device_map"))
        return predict_accelerate(s, dev, size_bytes(cap, "accelerate.max_memory") if cap else float("inf"),
                                  resident, transient)
    if baseline == "pipeline":
        return predict_pipeline(s, dev)
    return predict_tp(s, dev)


# ------------------------------------------------------------------------------------- the paper's settings

# What TPI-LLM reports (README of github.com/Lizonghang/TPI-LLM, tpi-mx branch; arXiv 2410.00531): full
# precision (fp32), CPU only, token latency in s/token; "Klonet": 8 devices on a wired edge network;
# "home": 4 laptops over Wi-Fi; Transformers and Accelerate on one Mac M1 laptop (8 cores, 8 GB).
PAPER_REPORTED = {
    # model: (transformers, accelerate, TPI-LLM Klonet 8 devices, TPI-LLM home 4 laptops) s/token
    "Llama 2-7B": (56.0, 26.0, 3.0, 5.0),
    "Llama 3.1-8B": (65.0, 31.0, 4.0, 8.0),
    "Llama 2-13B": (None, None, 3.0, 9.0),
    "Yi-34B": (None, None, 14.0, 29.0),
}
PAPER_PEAK_MEMORY_70B_GB = 3.1  # abstract: Llama 2-70B on 8 devices, peak memory per device

PAPER_SHAPES = {
    "Llama 2-7B": ModelShape(4096, 11008, 32, 32, 128, 32, 32000),
    "Llama 3.1-8B": ModelShape(4096, 14336, 32, 8, 128, 32, 128256),
    "Llama 2-13B": ModelShape(5120, 13824, 40, 40, 128, 40, 32000),
    "Yi-34B": ModelShape(7168, 20480, 56, 8, 128, 60, 64000),
    "Llama 2-70B": ModelShape(8192, 28672, 64, 8, 128, 80, 32000),
}


@dataclass(frozen=True)
class PaperAssumptions:
    """The paper's testbed as we assume it where it does not say (documented in the README table):
    an 8-core laptop-class CPU per device, NVMe-class disk, links of the paper's network profile."""

    device_flops: float = 100e9  # fp32 FLOP/s of 8 cores with AVX2/NEON, sustained in torch
    device_weight_bw: float = 20e9  # bytes/s of weights through a matrix-vector product (DRAM bound)
    disk_bw: float = 2e9  # bytes/s sequential read (NVMe SSD)
    base_rss: float = 0.5e9  # Python + torch
    latency_s: float = 1e-3  # one-way link latency (conf/network/paper.yaml of the emulator issue)
    bandwidth_bit_s: float = 300e6
    window: int = 4  # the paper's sliding window (blocks), as we read it
    memory: float = 8e9  # RAM of the one laptop that runs the Transformers and Accelerate baselines


def predict_paper(assume: PaperAssumptions, layer_overhead_s: float,
                  fixed: dict[str, FixedCost] | None = None) -> list[dict[str, Any]]:
    """fixed: the fixed costs measured here on one process (fit_fixed_costs(...)[1]): a device of its own
    pays those, and the paper's links for its allreduces (no oversubscription, one disk per device). Accelerate
    keeps reading its offloaded bytes from disk: on the paper's 8 GB laptop they do not stay in the page cache."""
    one = {k: v for k, v in (fixed or {}).items() if k in ("tp:star", "transformers")}
    dev = Device(flops=assume.device_flops, weight_bw=assume.device_weight_bw, layer_overhead_s=layer_overhead_s,
                 disk_bw=assume.disk_bw, base_rss=assume.base_rss, base_rss_master=assume.base_rss,
                 host_cores=None, fixed={1: one} if one else None)
    link = LinkModel(assume.latency_s, 8 / assume.bandwidth_bit_s)
    links = {"star": link, "bcast": link, "p2p": link, "default": link}
    rows = []
    for name, shape in PAPER_SHAPES.items():
        rep = PAPER_REPORTED.get(name, (None, None, None, None))
        klonet = predict_tp(Setting(shape, 8, links=links, window=assume.window), dev)
        home_link = LinkModel(3e-3, 8 / 100e6)  # Wi-Fi profile: 3 ms, 100 Mbit/s
        home = predict_tp(Setting(shape, 4, links={"star": home_link, "bcast": home_link}, window=assume.window),
                          dev)
        hf = predict_transformers(Setting(shape, 1), dev, memory=assume.memory)
        acc = predict_accelerate(Setting(shape, 1), dev, max_memory=assume.memory - assume.base_rss)
        rows.append({"model": name, "params_b": shape.total_bytes / FP32 / 1e9,
                     "pred_tpi_8_s": klonet.token_latency_s, "paper_tpi_8_s": rep[2],
                     "pred_tpi_4_wifi_s": home.token_latency_s, "paper_tpi_4_wifi_s": rep[3],
                     "pred_transformers_s": hf.token_latency_s, "paper_transformers_s": rep[0],
                     "pred_accelerate_s": acc.token_latency_s, "paper_accelerate_s": rep[1],
                     "pred_peak_gb_8": klonet.peak_bytes / 1e9, "pred_peak_worker_gb_8": klonet.peak_bytes_worker / 1e9,
                     "paper_peak_gb_8": PAPER_PEAK_MEMORY_70B_GB if name == "Llama 2-70B" else None,
                     "pred_ttft_8_s": klonet.ttft_s})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.perfmodel", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure this machine (~30 s) and write the calibration as JSON")
    c.add_argument("--out", default="calibration.json")
    c.add_argument("--mpirun", default=str(Path(sys.executable).with_name("mpirun")))
    c.add_argument("--bind-to", default="core",
                   help="mpirun -bind-to for the runs (as experiments.run_all: core); none: no binding")
    pp = sub.add_parser("paper", help="predict the paper's settings next to its reported numbers")
    pp.add_argument("--calibration", default=None,
                    help="for the fixed costs of one process (default: 1 ms per layer)")
    pl = sub.add_parser("probe-links", help=argparse.SUPPRESS)
    pl.add_argument("--hidden", type=int, default=1024)
    pl.add_argument("--repeats", type=int, default=40)
    a = p.parse_args(argv)
    if a.cmd == "probe-links":
        _probe_links_rank(a.hidden, a.repeats)
        return 0
    if a.cmd == "calibrate":
        calib = calibrate(bound_mpirun(a.mpirun, a.bind_to))
        from .results import write_json_atomic

        write_json_atomic(a.out, calib)
        print(json.dumps({k: v for k, v in calib.items() if k != "links"}, indent=1))
        return 0
    overhead, fixed = 1e-3, None
    if a.calibration:
        calib = json.loads(Path(a.calibration).read_text())
        overhead = calib["compute_1_thread"]["layer_overhead_s"]
        fixed = fit_fixed_costs(calib["fixed_costs"]).get(1) if "fixed_costs" in calib else None
    for row in predict_paper(PaperAssumptions(), overhead, fixed):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
