"""The performance model: shapes count the real parameters, predictions move the right way with N, links,
window and disk, and the link fit recovers a known alpha-beta."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from tpi_mpi.comm.cost_model import LinkModel, predict
from tpi_mpi.make_model import make_model
from tpi_mpi.perf.calibrate import fit_link
from tpi_mpi.perf.paper import PAPER_SHAPES, PaperAssumptions, predict_paper
from tpi_mpi.perf.predict import predict_accelerate, predict_pipeline, predict_tp, predict_transformers
from tpi_mpi.perf.shapes import Device, ModelShape, Setting

DEV = Device(flops=50e9, weight_bw=10e9, layer_overhead_s=1e-4, disk_bw=1e9, base_rss=300e6, base_rss_master=350e6,
             host_cores=None)
SHAPE = PAPER_SHAPES["Llama 2-7B"]


def test_shape_counts_the_checkpoints_parameters(tmp_path: Path) -> None:
    import json

    over = {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 320}
    model = make_model(tmp_path / "m", "tiny", "llama", layers=3, overrides=over)
    shape = ModelShape.from_hf_config(json.loads((model / "config.json").read_text()))
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        numel = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shape.layer_params == sum(v for k, v in numel.items() if k.startswith("model.layers.0."))
    assert shape.total_bytes == sum(numel.values()) * 4


def test_tp_faster_with_more_devices_on_fast_links_slower_on_slow_ones() -> None:
    fast = {"star": LinkModel(1e-5, 1e-10), "bcast": LinkModel(1e-5, 1e-10)}
    slow = {"star": LinkModel(20e-3, 8 / 20e6), "bcast": LinkModel(20e-3, 8 / 20e6)}
    t = [predict_tp(Setting(SHAPE, n, links=fast), DEV).token_latency_s for n in (1, 2, 4, 8)]
    assert t == sorted(t, reverse=True) and t[0] / t[-1] > 4
    assert predict_tp(Setting(SHAPE, 8, links=slow), DEV).token_latency_s > t[-1] + 2 * SHAPE.layers * 20e-3
    # on one shared host, N ranks share its compute: no speed-up from N, only added communication
    # N ranks on one 2-core host: faster up to 2 ranks, then no more (they share the 2 cores)
    shared = replace(DEV, host_cores=2)
    s = [predict_tp(Setting(SHAPE, n, links=fast), shared).token_latency_s for n in (1, 2, 4, 8)]
    assert s[1] < 0.6 * s[0] and s[1] <= s[2] <= s[3] < 0.7 * s[0]


def test_memory_falls_with_n_and_window_and_streaming_is_disk_bound() -> None:
    peaks = [predict_tp(Setting(SHAPE, n), DEV).peak_bytes_worker for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True)
    resident = predict_tp(Setting(SHAPE, 8), DEV)
    windows = [predict_tp(Setting(SHAPE, 8, window=w), DEV) for w in (1, 2, 4)]
    assert [w.peak_bytes for w in windows] == sorted(w.peak_bytes for w in windows) < [resident.peak_bytes]
    disk_bound = SHAPE.layers * SHAPE.layer_bytes / 8 / DEV.disk_bw
    assert windows[0].token_latency_s >= disk_bound > resident.token_latency_s


def test_baselines_order() -> None:
    fast = {"star": LinkModel(1e-5, 1e-10), "bcast": LinkModel(1e-5, 1e-10), "p2p": LinkModel(1e-5, 1e-10)}
    hf = predict_transformers(Setting(SHAPE, 1), DEV)
    acc = predict_accelerate(Setting(SHAPE, 1), DEV, max_memory=SHAPE.total_bytes / 4)
    pipe = predict_pipeline(Setting(SHAPE, 4, links=fast), DEV)
    tp = predict_tp(Setting(SHAPE, 4, links=fast), DEV)
    assert acc.token_latency_s > hf.token_latency_s > tp.token_latency_s  # offload reads, then 1/N compute
    assert pipe.token_latency_s > tp.token_latency_s  # stages one after another
    assert acc.peak_bytes < hf.peak_bytes and tp.peak_bytes_worker < hf.peak_bytes


@pytest.mark.parametrize("algo,n", [("star", 4), ("ring", 8), ("tree", 8), ("mesh", 3), ("bcast", 4), ("p2p", 2)])
def test_fit_link_recovers_alpha_beta(algo: str, n: int) -> None:
    link = LinkModel(30e-6, 2e-9)

    def t(m: int) -> float:
        if algo in ("bcast", "p2p"):
            return link.alpha + m * link.beta * (n - 1 if algo == "bcast" else 1)
        return predict(algo, n, m, link)

    fit = fit_link({"4096": t(4096), "65536": t(65536)}, algo, n)
    assert fit.alpha == pytest.approx(link.alpha, rel=1e-6) and fit.beta == pytest.approx(link.beta, rel=1e-6)


def test_paper_predictions_cover_the_models() -> None:
    rows = {r["model"]: r for r in predict_paper(PaperAssumptions(), 1e-4)}
    assert set(rows) == set(PAPER_SHAPES)
    r70 = rows["Llama 2-70B"]
    assert 65 < r70["params_b"] < 72
    assert r70["pred_peak_gb_8"] < PAPER_SHAPES["Llama 2-70B"].total_bytes / 8 / 1e9 / 4  # the window at work
    assert all(r["pred_tpi_8_s"] > 0 and r["pred_ttft_8_s"] >= r["pred_tpi_8_s"] for r in rows.values())


def test_software_links_add_their_hops() -> None:
    lat = 5e-3
    base = Setting(SHAPE, 4, algo="star")
    emu = replace(base, emulated=LinkModel(lat, 0.0))
    extra = predict_tp(emu, DEV).token_latency_s - predict_tp(base, DEV).token_latency_s
    assert extra == pytest.approx(SHAPE.layers * 2 * 2 * lat)  # 2 allreduces per layer, 2 hops each (star)
    ring = replace(emu, algo="ring")
    assert predict_tp(ring, DEV).token_latency_s > predict_tp(emu, DEV).token_latency_s  # 2(N-1) hops
