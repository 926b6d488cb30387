"""The paper's settings (Llama 2 shapes, its links and memory) predicted next to its reported numbers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpi_mpi.comm.cost_model import LinkModel
from tpi_mpi.perf.predict import predict_accelerate, predict_tp, predict_transformers
from tpi_mpi.perf.shapes import FP32, Device, FixedCost, ModelShape, Setting

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


