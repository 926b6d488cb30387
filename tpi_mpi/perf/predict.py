"""The cost terms of the performance model and its predictions: tensor parallelism and the baselines."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tpi_mpi.comm.cost_model import CANDIDATES, LinkModel, WireCost, predict_wire
from tpi_mpi.perf.shapes import FP32, Device, FixedCost, ModelShape, Prediction, Setting

# As weights/memplan.py and weights/tensorfile.py plan a budget (not imported: they bring in MPI and torch;
# tests/test_perfmodel.py checks that the figures agree).
DEFAULT_WINDOW = 2
HEAD_CHUNK_BYTES = 32 * 1024 * 1024
READ_CHUNK_BYTES = 16 * 1024 * 1024


def _share(dev: Device, active: int) -> float:
    """How many ranks share each core while `active` ranks compute at once."""
    return max(1.0, active / dev.host_cores) if dev.host_cores else 1.0


def _compute(shape: ModelShape, q: int, n: int, dev: Device, active: int) -> float:
    """One layer's slice of 1/n of the work on one rank, while `active` ranks compute at once on the host."""
    share = _share(dev, active)
    # CPU time, overheads included, stretched by the number of ranks per core
    return share * (_weights_time(shape, q, n, dev) + dev.layer_overhead_s)


def _link(s: Setting, name: str) -> LinkModel:
    return s.links.get(name) or s.links.get("default") or LinkModel(0.0, 0.0)


def _head(shape: ModelShape, dev: Device) -> float:
    return shape.head_bytes / dev.weight_bw_for(shape.weights)  # rank 0 alone


def _head_time(s: Setting, dev: Device, stretch: float, stretch_wait: float) -> float:
    """lm_head of the last token: rank 0 alone while the others wait (memory.head=master), or every rank its
    vocab/N rows at once, then rank 0 gathers the logits (split: one more hop, (N-1) slices of vocab/N floats)."""
    if s.head != "split" or s.n < 2:
        return stretch_wait * _head(s.shape, dev)
    b = _link(s, "bcast")
    gather = b.alpha + (s.n - 1) * (s.shape.vocab / s.n * FP32) * b.beta
    return stretch * _head(s.shape, dev) / s.n + gather


def per_pair_time(algo: str, n: int, nbytes: int, link: LinkModel) -> float:
    """An allreduce over links modelled per pair of ranks (tpi_mpi/comm/links.py, emulation.links=software):
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
        from tpi_mpi.comm.cost_model import tree_rounds

        return tree_rounds(n) * hop
    return 2 * hop  # mpi: not modelled by the software links (they apply to our algorithms only)


def _choices(s: Setting) -> list[tuple[str, WireCost]]:
    """The (algorithm, wire) pairs the run may use: its own, or every candidate for comm.algo=auto (which picks
    the fastest per message size), over the wires of comm.dtype=auto if it may pick those too."""
    if s.algo != "auto":
        return [(s.algo, s.wire)]
    wires = list((s.wire_choice or {"": s.wire}).values())
    return [(a, w) for a in CANDIDATES for w in wires]


def _allreduce_fit(s: Setting, nbytes: int, choice: tuple[str, WireCost] | None = None) -> float:
    """One allreduce of `nbytes` of float32 values through the calibrated links (alpha-beta fits of the probe),
    sent as the wire of `choice` (default: the setting's algorithm and wire)."""
    algo, wire = choice or (s.algo, s.wire)
    link = _link(s, algo)
    if algo in CANDIDATES:
        return predict_wire(algo, s.n, nbytes // FP32, link, wire)
    return link.alpha + nbytes * link.beta if s.n > 1 else 0.0  # mpi: fitted as one alpha + m beta (fp32)


def _allreduce_emulated(s: Setting, nbytes: int, choice: tuple[str, WireCost] | None = None) -> float:
    """What the software links (emulation.links=software) add to one allreduce."""
    algo, wire = choice or (s.algo, s.wire)
    if s.emulated is None or algo == "mpi":
        return 0.0
    return per_pair_time(algo, s.n, math.ceil(nbytes // FP32 * wire.bytes_per_value), s.emulated)


def _allreduce(s: Setting, nbytes: int) -> float:
    return min(_allreduce_fit(s, nbytes, c) + _allreduce_emulated(s, nbytes, c) for c in _choices(s))


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
    """One layer's slice of 1/n of the work on one rank with a core of its own, at its weight format's speed."""
    fmt = shape.weights
    return max(2 * q * shape.layer_params / n / dev.flops_for(fmt), shape.layer_bytes / n / dev.weight_bw_for(fmt))


def _stream_read(shape: ModelShape, n: int, dev: Device) -> float:
    """One layer's 1/n read from disk by each of the n ranks at once (they share the one disk here)."""
    return _read_time(shape.layer_bytes / n, n, dev)


def _read_time(rank_bytes: float, n: int, dev: Device) -> float:
    """Seconds for each of the n ranks to read `rank_bytes` at once: from the one disk of this host (the
    aggregate bandwidth of n readers), or each from a disk of its own."""
    if dev.disk_bw_readers and dev.host_cores:
        return rank_bytes * n / interpolate(dev.disk_bw_readers, n, dev.disk_bw)
    return rank_bytes / dev.disk_bw


@dataclass(frozen=True)
class BudgetLayout:
    """What one rank holds under memory.budget (memory.resident=auto), as weights/memplan.py plans it: the
    window first (lowered to 1 if that is all that fits), then with what is left lm_head (its rows), FFN
    blocks, attention blocks resident; the rest is read from disk every forward pass."""

    peak: float  # bytes: base, KV cache, window buffers, read cache, resident weights (the plan's total)
    streamed: float  # weight bytes read per forward pass
    first_blocks: float  # the window's first streamed blocks, read before the prompt's clock starts
    resident_blocks: int  # of the 2L attention and FFN blocks


def budget_layout(s: Setting, dev: Device, master: bool) -> BudgetLayout:
    """The plan of rank 0 (`master`: its embedding and, with head=master, all of lm_head) or of a worker."""
    assert s.budget is not None
    sh, n = s.shape, s.n
    attn, ffn = sh.attn_bytes / n, sh.ffn_bytes / n
    blocks = sh.layers * (attn + ffn)
    head = sh.head_bytes / n if s.head == "split" and n > 1 else (sh.head_bytes if master else 0.0)
    fixed = sh.kv_bytes(s.prompt_tokens + s.new_tokens, n) + (dev.base_rss_master if master else dev.base_rss)
    if master:
        fixed += sh.master_bytes - sh.head_bytes  # the embedding and the final norm
    if fixed + blocks + head <= s.budget:
        return BudgetLayout(fixed + blocks + head, 0.0, 0.0, 2 * sh.layers)
    largest, head_stream = max(attn, ffn), min(head, HEAD_CHUNK_BYTES)

    def stream_cost(w: int) -> float:
        return w * largest + READ_CHUNK_BYTES + head_stream

    if s.budget < fixed + stream_cost(1):
        raise ValueError(f"memory.budget {s.budget / 1e9:.2f} GB is below the smallest workable one, "
                         f"{(fixed + stream_cost(1)) / 1e9:.2f} GB")
    target = s.window or DEFAULT_WINDOW
    window = target
    while window > 1 and fixed + stream_cost(window) > s.budget:
        window -= 1
    left = s.budget - fixed - stream_cost(window) if window == target else 0.0
    head_resident = 0 < head and head - head_stream <= left
    if head_resident:
        left -= head - head_stream
    k_ffn = min(sh.layers, int(left // ffn))
    left -= k_ffn * ffn
    k_attn = min(sh.layers, int(left // attn))
    resident = k_ffn * ffn + k_attn * attn
    streamed = blocks - resident + (0.0 if head_resident else head)
    per_block = (blocks - resident) / max(1, 2 * sh.layers - k_ffn - k_attn)
    peak = fixed + stream_cost(window) + resident + (head - head_stream if head_resident else 0.0)
    return BudgetLayout(peak, streamed, min(window * per_block, blocks - resident), k_ffn + k_attn)


def _streamed(s: Setting, dev: Device, q: int) -> tuple[float, float]:
    """Weight bytes the busiest rank reads from disk in one forward pass of q tokens, and the seconds that
    takes (the reads overlap compute and communication). The prompt's pass is spared what the prefetcher
    read into the window at start-up, before the clock started."""
    sh, n = s.shape, s.n
    if s.budget is not None:
        plans = [budget_layout(s, dev, master) for master in ((True, False) if n > 1 else (True,))]
        busiest = max(plans, key=lambda p: p.streamed)
        rank_bytes = busiest.streamed - (busiest.first_blocks if q > 1 else 0.0)
        return busiest.streamed, _read_time(max(0.0, rank_bytes), n, dev)
    if s.window is None:
        return 0.0, 0.0
    read = sh.layers * _stream_read(sh, n, dev)
    if q > 1:
        read *= 1 - sh.window_bytes(s.window) / (sh.layers * sh.layer_bytes)
    return sh.layers * sh.layer_bytes / n, read


def _tp_forward(s: Setting, dev: Device, q: int) -> float:
    sh, n = s.shape, s.n
    msg = q * sh.hidden * FP32
    measured = fixed_cost(dev, n, "tp:" + s.algo)
    if measured is None:  # not calibrated: a fixed cost per layer, stretched by the ranks per core
        per_layer = _compute(sh, q, n, dev, n) + 2 * _allreduce(s, msg)
        if s.window is not None and s.budget is None:  # streaming: the disk reads overlap compute and comms
            per_layer = max(per_layer, _stream_read(sh, n, dev))
        layers = sh.layers * per_layer
        if s.budget is not None:
            layers = max(layers, _streamed(s, dev, q)[1])
        return _bcast(s, msg) + layers + _head_time(s, dev, _share(dev, n), 1.0) + dev.forward_overhead_s
    fixed, paid = measured
    probe = q * fixed.probe_hidden * FP32 if paid else 0  # the messages the fixed costs already include
    stretch = interpolate(dev.stretch_all, n, _share(dev, n))
    # the bytes beyond the probe's: CPU work (copies, sums) too, so stretched like the products
    comm = min(stretch * max(0.0, _allreduce_fit(s, msg, c) - _allreduce_fit(s, probe, c))
               + _allreduce_emulated(s, msg, c) for c in _choices(s))
    per_layer = (stretch * _weights_time(sh, q, n, dev) + fixed.forward(1, q > 1) - fixed.forward(0, q > 1)
                 + 2 * comm)
    layers = max(sh.layers * per_layer, _streamed(s, dev, q)[1])  # streaming: reads overlap the rest
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
    if s.budget is not None:
        return budget_layout(s, dev, True).peak, budget_layout(s, dev, n == 1).peak
    layers_held = sh.layers if s.window is None else min(s.window, sh.layers)
    worker = dev.base_rss + layers_held * sh.layer_bytes / n + sh.kv_bytes(s.prompt_tokens + s.new_tokens, n)
    master_only = sh.master_bytes
    if s.head == "split" and n > 1:  # every rank holds vocab/N rows of lm_head; rank 0 still the embedding
        head_bytes = sh.head_bytes
        worker += head_bytes / n
        master_only -= head_bytes if not sh.tied else 0
    return worker - dev.base_rss + dev.base_rss_master + master_only, worker


def predict_tp(s: Setting, dev: Device) -> Prediction:
    master, worker = _peak(s, dev)
    return Prediction(_tp_forward(s, dev, s.prompt_tokens), _tp_forward(s, dev, 1), master, worker,
                      streamed_bytes=_streamed(s, dev, 1)[0])


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
    from tpi_mpi.baselines.pipeline import POLL_S

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

