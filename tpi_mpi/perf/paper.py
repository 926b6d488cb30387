"""The paper's settings (Llama 2 shapes, its links and memory) predicted next to its reported numbers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from tpi_mpi.comm.cost_model import LinkModel, WireCost, choose_wire
from tpi_mpi.comm.wire import AUTO_WIRES
from tpi_mpi.perf.predict import budget_layout, predict_accelerate, predict_tp, predict_transformers
from tpi_mpi.perf.shapes import FP32, Device, FixedCost, ModelShape, Prediction, Setting

PAPER_REPORTED = {
    # model: (transformers, accelerate, TPI-LLM Klonet 8 devices, TPI-LLM home 4 laptops) s/token
    "Llama 2-7B": (56.0, 26.0, 3.0, 5.0),
    "Llama 3.1-8B": (65.0, 31.0, 4.0, 8.0),
    "Llama 2-13B": (None, None, 3.0, 9.0),
    "Yi-34B": (None, None, 14.0, 29.0),
}
PAPER_PEAK_MEMORY_70B_GB = 3.1  # abstract: Llama 2-70B on 8 devices, peak memory per device
PAPER_70B_TOKEN_S = 26.1  # Llama 2-70B on 8 devices, as issue 15 quotes the paper (not in the README table)
TARGET_70B_INT4_S = 2.6  # issue 15: int4 Llama 2-70B on 8 devices with the paper's links and memory

PAPER_SHAPES = {
    "Llama 2-7B": ModelShape(4096, 11008, 32, 32, 128, 32, 32000),
    "Llama 3.1-8B": ModelShape(4096, 14336, 32, 8, 128, 32, 128256),
    "Llama 2-13B": ModelShape(5120, 13824, 40, 40, 128, 40, 32000),
    "Yi-34B": ModelShape(7168, 20480, 56, 8, 128, 60, 64000),
    "Llama 2-70B": ModelShape(8192, 28672, 64, 8, 128, 80, 32000),
}


@dataclass(frozen=True)
class PaperAssumptions:
    """The paper's testbed as we assume it where it does not say (documented in docs/experiments.md):
    an 8-core laptop-class CPU per device, NVMe-class disk, links of the paper's network profile."""

    device_flops: float = 100e9  # fp32 FLOP/s of 8 cores with AVX2/NEON, sustained in torch
    device_weight_bw: float = 20e9  # bytes/s of weights through a matrix-vector product (DRAM bound)
    disk_bw: float = 2e9  # bytes/s sequential read (NVMe SSD)
    base_rss: float = 0.5e9  # Python + torch
    latency_s: float = 1e-3  # one-way link latency (conf/network/paper.yaml of the emulator issue)
    bandwidth_bit_s: float = 300e6
    window: int = 4  # the paper's sliding window (blocks), as we read it
    memory: float = 8e9  # RAM of the one laptop that runs the Transformers and Accelerate baselines
    # Each of the 8 devices' memory, the weight formats' memory.budget: "Llama 2-70B on 8 devices with 3GB of
    # memory on each device" (TPI-LLM's README), conf/device/paper.yaml's 3 GiB.
    device_memory: float = 3 * 2**30
    # Encoding and decoding the wire formats (seconds per value) where no calibration says: medians of
    # comm.wire.measure_codecs on one 8192-value hidden state, this host, load ~10.
    wire_codecs: dict[str, WireCost] = field(default_factory=lambda: {
        "fp32": WireCost(4.0), "fp16": WireCost(2.0, 1.7e-9, 1.1e-9), "bf16": WireCost(2.0, 2.1e-9, 0.5e-9),
        "int8": WireCost(1.125, 3.5e-9, 0.8e-9)})


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




# ------------------------------------------------------------------------------ the paper's settings per format

PAPER_FORMATS = ("fp32", "fp16", "int8", "int4")  # int4: the split's default group size
FORMAT_MODELS = ("Llama 2-7B", "Llama 2-13B", "Llama 2-70B")


def paper_device(assume: PaperAssumptions, layer_overhead_s: float, fixed: dict[str, FixedCost] | None = None,
                 kernels: dict[str, Any] | None = None) -> Device:
    """One of the paper's devices. `kernels`: perf.kernels.measure_formats(...) with all cores here; each format
    then reaches the fraction of the memory bound its kernel reaches here (fp32 too), the paper's assumed
    device_weight_bw being that bound; prefill at fp32's FLOP/s times the kernel's ratio to fp32's. Without
    it every format reads its weights at the bound."""
    one = {k: v for k, v in (fixed or {}).items() if k in ("tp:star", "transformers")}
    bw = prefill = None
    if kernels is not None:
        read, f = kernels["read_bw"], kernels["formats"]
        bw = {k: assume.device_weight_bw * min(1.0, v["weight_bw"] / read) for k, v in f.items()}
        prefill = {k: v["flops"] / f["fp32"]["flops"] for k, v in f.items()}
    return Device(flops=assume.device_flops, weight_bw=bw["fp32"] if bw else assume.device_weight_bw,
                  layer_overhead_s=layer_overhead_s, disk_bw=assume.disk_bw, base_rss=assume.base_rss,
                  base_rss_master=assume.base_rss, host_cores=None, fixed={1: one} if one else None,
                  weight_bw_formats=bw, prefill_speed_formats=prefill)


def _format_setting(assume: PaperAssumptions, shape: ModelShape, budget: float) -> Setting:
    link = LinkModel(assume.latency_s, 8 / assume.bandwidth_bit_s)
    links = {"star": link, "bcast": link, "p2p": link, "default": link}
    return Setting(shape, 8, links=links, head="split", budget=budget)


def predict_paper_formats(assume: PaperAssumptions, layer_overhead_s: float,
                          fixed: dict[str, FixedCost] | None = None, kernels: dict[str, Any] | None = None,
                          codecs: dict[str, WireCost] | None = None,
                          formats: tuple[str, ...] = PAPER_FORMATS) -> list[dict[str, Any]]:
    """Llama 2 7B/13B/70B on the paper's 8 devices (its links, memory.budget = its device memory, memory.head
    =split, the rest as predict_paper) with the linear weights in each format: allreduce as the paper's (star,
    fp32 on the wire) and as comm=auto with comm.dtype=auto picks it (int8 on the wire where it pays)."""
    dev = paper_device(assume, layer_overhead_s, fixed, kernels)
    codecs = codecs or assume.wire_codecs
    wires = {w: codecs[w] for w in AUTO_WIRES}
    rows = []
    for name in FORMAT_MODELS:
        for key in formats:
            shape = PAPER_SHAPES[name].with_format(key)
            s = _format_setting(assume, shape, assume.device_memory)
            star = predict_tp(s, dev)
            best = predict_tp(replace(s, algo="auto", wire_choice=wires), dev)
            (algo, wire), _ = choose_wire(8, shape.hidden, s.links["default"], wires)
            rows.append({"model": name, "format": shape.weights.key,
                         "bytes_per_weight": shape.weights.bytes_per_weight(shape.hidden),
                         "slice_gb": (shape.layers * shape.layer_bytes + shape.head_bytes) / 8 / 1e9,
                         "streamed_gb": best.streamed_bytes / 1e9,
                         "pred_star_fp32_wire_s": star.token_latency_s, "pred_auto_s": best.token_latency_s,
                         "auto_picks": f"{algo} {wire}", "pred_ttft_s": best.ttft_s,
                         "pred_peak_gb": best.peak_bytes / 1e9, "pred_peak_worker_gb": best.peak_bytes_worker / 1e9,
                         "budget_gb": assume.device_memory / 1e9,
                         "paper_s": _paper_fp32(name) if key == "fp32" else None})
    return rows


def _paper_fp32(name: str) -> float | None:
    return PAPER_70B_TOKEN_S if name == "Llama 2-70B" else PAPER_REPORTED.get(name, (None,) * 4)[2]


def budget_for(assume: PaperAssumptions, dev: Device, shape: ModelShape, target_s: float,
               wires: dict[str, WireCost]) -> tuple[float, Prediction] | None:
    """The smallest memory.budget per device (to 1 MB) at which comm=auto (comm.dtype=auto) predicts a token
    latency within `target_s`, and the prediction there; None if even everything resident misses it."""
    def at(budget: float) -> Prediction:
        return predict_tp(replace(_format_setting(assume, shape, budget), algo="auto", wire_choice=wires), dev)

    s = _format_setting(assume, shape, 1e15)
    hi = max(budget_layout(s, dev, True).peak, budget_layout(s, dev, False).peak)  # all resident
    if at(hi).token_latency_s > target_s:
        return None
    lo = 0.0
    while hi - lo > 1e6:
        mid = (lo + hi) / 2
        try:
            ok = at(mid).token_latency_s <= target_s
        except ValueError:  # below the smallest workable budget
            ok = False
        lo, hi = (lo, mid) if ok else (mid, hi)
    return hi, at(hi)


def target_70b(assume: PaperAssumptions, layer_overhead_s: float, fixed: dict[str, FixedCost] | None = None,
               kernels: dict[str, Any] | None = None, codecs: dict[str, WireCost] | None = None,
               key: str = "int4") -> dict[str, Any]:
    """Issue 15's target: int4 Llama 2-70B on 8 devices with the paper's links and memory within 2.6 s per
    token; the prediction at the paper's device memory, and the smallest budget that meets the target."""
    dev = paper_device(assume, layer_overhead_s, fixed, kernels)
    codecs = codecs or assume.wire_codecs
    wires = {w: codecs[w] for w in AUTO_WIRES}
    shape = PAPER_SHAPES["Llama 2-70B"].with_format(key)
    s = replace(_format_setting(assume, shape, assume.device_memory), algo="auto", wire_choice=wires)
    at_paper = predict_tp(s, dev)
    needed = budget_for(assume, dev, shape, TARGET_70B_INT4_S, wires)
    return {"format": shape.weights.key, "target_s": TARGET_70B_INT4_S, "pred_s": at_paper.token_latency_s,
            "met": at_paper.token_latency_s <= TARGET_70B_INT4_S, "budget_gb": assume.device_memory / 1e9,
            "peak_gb": at_paper.peak_bytes / 1e9, "peak_worker_gb": at_paper.peak_bytes_worker / 1e9,
            "min_budget_gb": needed[0] / 1e9 if needed else None,
            "min_budget_pred_s": needed[1].token_latency_s if needed else None}


def formats_table(rows: list[dict[str, Any]], target: dict[str, Any] | None = None) -> str:
    """predict_paper_formats' rows (and target_70b's line) as a markdown table."""
    def f(v: float | None, fmt: str = "{:.2f}") -> str:
        return "—" if v is None else fmt.format(v)

    lines = ["| model | weights | B/weight | GB/device | streamed GB/token | s/token star, fp32 wire | "
             "s/token auto | auto picks | TTFT s | peak GB rank 0 / others | paper s/token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['format']} | {r['bytes_per_weight']:.3f} | {r['slice_gb']:.2f} | "
                     f"{r['streamed_gb']:.2f} | {r['pred_star_fp32_wire_s']:.2f} | {r['pred_auto_s']:.2f} | "
                     f"{r['auto_picks']} | {r['pred_ttft_s']:.1f} | {r['pred_peak_gb']:.2f} / "
                     f"{r['pred_peak_worker_gb']:.2f} | {f(r['paper_s'], '{:.1f}')} |")
    if target is not None:
        verdict = "met" if target["met"] else "NOT met"
        lines += ["", f"Target: Llama 2-70B {target['format']} on 8 devices <= {target['target_s']} s/token: "
                  f"predicted {target['pred_s']:.2f} s at a {target['budget_gb']:.2f} GB budget per device "
                  f"(peak {target['peak_gb']:.2f} GB rank 0, {target['peak_worker_gb']:.2f} GB others): {verdict}; "
                  f"smallest budget that meets it: {f(target['min_budget_gb'])} GB "
                  f"({f(target['min_budget_pred_s'])} s/token)."]
    return "\n".join(lines) + "\n"
