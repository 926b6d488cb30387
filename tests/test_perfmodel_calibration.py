"""The performance model's calibration on this host: fixed costs fitted from two layer counts, interpolation in
N, the compute stretch and the k-reader disk bandwidth in the predictions, and the real measurements (disk
readers, the fixed-cost runs, the probe's stretch and relay) on 1 and 2 ranks."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import mpirun

from tpi_mpi.baselines.pipeline import POLL_S
from tpi_mpi.comm.cost_model import LinkModel, predict
from tpi_mpi.perf.calibrate import fit_link
from tpi_mpi.perf.measure import fit_fixed_costs, measure_disk_readers, measure_fixed_costs
from tpi_mpi.perf.paper import PAPER_SHAPES
from tpi_mpi.perf.predict import fixed_cost, interpolate, predict_pipeline, predict_tp, predict_transformers
from tpi_mpi.perf.shapes import Device, FixedCost, ModelShape, Setting

MPIRUN = str(Path(sys.executable).with_name("mpirun"))
SHAPE = PAPER_SHAPES["Llama 2-7B"]


def _raw(pass_s: float, layer_s: float, prefill_factor: float = 3.0) -> dict[str, dict[str, float]]:
    """What the runs would measure with exactly these fixed costs, at 1 and 4 layers."""
    return {str(n): {"ttft_s": prefill_factor * (pass_s + n * layer_s), "token_s": pass_s + n * layer_s}
            for n in (1, 4)}


def test_fit_fixed_costs_recovers_per_pass_and_per_layer() -> None:
    fits = fit_fixed_costs({"probe_hidden": 128, "raw": {
        "1": {"tp:star": _raw(1e-3, 2e-4), "accelerate": _raw(5e-3, 1e-3)},
        "4": {"tp:ring": _raw(2e-3, 1e-3)}}})
    star = fits[1]["tp:star"]
    assert star.pass_token_s == pytest.approx(1e-3) and star.layer_token_s == pytest.approx(2e-4)
    assert star.pass_prefill_s == pytest.approx(3e-3) and star.layer_prefill_s == pytest.approx(6e-4)
    assert fits[1]["accelerate"].forward(10, prefill=False) == pytest.approx(5e-3 + 10e-3)
    assert fits[4]["tp:ring"].layer_token_s == pytest.approx(1e-3)
    # noise that makes more layers look cheaper gives no negative cost
    noisy = fit_fixed_costs({"raw": {"2": {"tp:star": {"1": {"ttft_s": 5e-3, "token_s": 2e-3},
                                                       "4": {"ttft_s": 4e-3, "token_s": 1e-3}}}}})
    assert noisy[2]["tp:star"].layer_token_s == 0.0 and noisy[2]["tp:star"].pass_token_s == pytest.approx(2e-3)


def test_interpolate_linear_between_measured_sizes_nearest_outside() -> None:
    table = {2: 1.0, 4: 3.0, 8: 11.0}
    assert interpolate(table, 3, 0.0) == pytest.approx(2.0)
    assert interpolate(table, 6, 0.0) == pytest.approx(7.0)
    assert interpolate(table, 1, 0.0) == 1.0 and interpolate(table, 16, 0.0) == 11.0
    assert interpolate(None, 4, 5.0) == 5.0


def _device(**kw: object) -> Device:
    base = Device(flops=50e9, weight_bw=10e9, layer_overhead_s=1e-4, disk_bw=1e9, base_rss=300e6,
                  base_rss_master=350e6, host_cores=2)
    return replace(base, **kw)  # type: ignore[arg-type]


def test_fixed_cost_lookup_skips_n1_for_communicating_runs_and_falls_back_to_star() -> None:
    one = FixedCost(1e-3, 1e-4, 2e-3, 2e-4)
    four = FixedCost(3e-3, 5e-4, 6e-3, 1e-3)
    eight = FixedCost(7e-3, 9e-4, 9e-3, 3e-3)
    dev = _device(fixed={1: {"tp:star": one}, 4: {"tp:star": four, "tp:ring": four}, 8: {"tp:star": eight}})
    fc, paid = fixed_cost(dev, 2, "tp:star") or (None, None)
    assert fc == four and paid  # N = 2 from N = 4, not halfway to N = 1 (which has no allreduces)
    fc, paid = fixed_cost(dev, 6, "tp:star") or (None, None)
    assert fc is not None and fc.layer_token_s == pytest.approx(7e-4) and paid
    fc, paid = fixed_cost(dev, 1, "tp:mesh") or (None, None)  # mesh not measured anywhere: star's
    assert fc == one and not paid
    assert fixed_cost(dev, 4, "transformers") is None and fixed_cost(_device(), 4, "tp:star") is None


def test_calibrated_tp_is_fixed_costs_plus_stretched_products_plus_the_bigger_messages() -> None:
    shape = ModelShape(hidden=1024, ffn=2752, heads=16, kv_heads=8, head_dim=64, layers=4, vocab=512)
    link = LinkModel(20e-6, 1e-9)
    links = {"star": link, "bcast": link}
    fixed = FixedCost(2e-3, 1e-3, 4e-3, 3e-3, probe_hidden=128)
    dev = _device(fixed={4: {"tp:star": fixed}}, stretch_all={4: 2.0}, stretch_wait={4: 1.5})
    s = Setting(shape, 4, links=links)
    weights = max(2 * shape.layer_params / 4 / dev.flops, shape.layer_bytes / 4 / dev.weight_bw)
    extra_msg = 2.0 * (predict("star", 4, 1024 * 4, link) - predict("star", 4, 128 * 4, link))
    head = 1.5 * shape.vocab * shape.hidden * 4 / dev.weight_bw
    extra_bcast = 2.0 * 3 * (1024 - 128) * 4 * 1e-9
    expected = 2e-3 + 4 * (1e-3 + 2.0 * weights + 2 * extra_msg) + head + extra_bcast
    assert predict_tp(s, dev).token_latency_s == pytest.approx(expected, rel=1e-6)
    # twice the stretch: the products' share doubles, nothing else
    slower = predict_tp(s, replace(dev, stretch_all={4: 4.0})).token_latency_s
    assert slower - expected == pytest.approx(4 * 2.0 * weights + 4 * 2 * extra_msg + extra_bcast, rel=1e-6)


def test_streamed_reads_share_the_disk_and_the_window_is_filled_before_the_prompt() -> None:
    fixed = FixedCost(1e-3, 1e-4, 1e-3, 1e-4)
    dev = _device(fixed={4: {"tp:star": fixed}}, stretch_all={4: 2.0}, disk_bw_readers={1: 1e9, 4: 2e9})
    s = Setting(SHAPE, 4, window=2)
    read_all = SHAPE.layers * SHAPE.layer_bytes / 2e9  # 4 ranks read their quarter at once: aggregate 2 GB/s
    assert predict_tp(s, dev).token_latency_s == pytest.approx(read_all + 1e-3, rel=0.05)
    ttft = [predict_tp(replace(s, window=w), dev).ttft_s for w in (1, 2, 4)]
    assert ttft == sorted(ttft, reverse=True) and ttft[0] < read_all + 1e-3
    assert SHAPE.window_bytes(2) == SHAPE.layer_bytes  # attention + FFN block of the first layer


def test_pipeline_stages_are_one_process_passes_plus_relay_hops() -> None:
    fixed = FixedCost(1e-3, 1e-4, 1e-3, 1e-4)
    relay = LinkModel(1e-3, 0.0)
    base = Setting(SHAPE, 4, links={"relay": relay, "p2p": LinkModel(0.0, 0.0)})
    dev = _device(fixed={1: {"tp:star": fixed}})
    one = predict_transformers(replace(base, n=1), replace(dev, fixed={1: {"transformers": fixed}}))
    # the waiting stages sleep between looks: no stretch; 4 hops of 1 ms plus half a look each
    assert predict_pipeline(base, dev).token_latency_s == pytest.approx(one.token_latency_s + 4 * (1e-3 + POLL_S / 2))


def test_pipeline_calibrated_pass_cost_replaces_the_hop_terms() -> None:
    measured = {"probe_hidden": 128, "raw": {
        "1": {"tp:star": {"1": {"token_s": 1.1e-3, "ttft_s": 2.2e-3}, "4": {"token_s": 1.4e-3, "ttft_s": 2.8e-3}}},
        "4": {"pipeline": {"4": {"token_s": 9.4e-3, "ttft_s": 12.8e-3}}}}}
    fits = fit_fixed_costs(measured)
    pipe = fits[4]["pipeline"]
    assert pipe.layer_token_s == pytest.approx(1e-4) and pipe.pass_token_s == pytest.approx(9e-3)
    assert pipe.layer_prefill_s == pytest.approx(2e-4) and pipe.pass_prefill_s == pytest.approx(12e-3)
    dev = _device(fixed=fits)
    s = Setting(SHAPE, 4, links={"relay": LinkModel(1.0, 0.0)})  # a hop's alpha is in the measured pass
    stage = predict_pipeline(replace(s, n=1), dev).token_latency_s - fits[1]["tp:star"].forward(SHAPE.layers, False)
    assert predict_pipeline(s, dev).token_latency_s == pytest.approx(pipe.forward(SHAPE.layers, False) + stage)


def test_fit_link_relay_is_n_hops() -> None:
    link = LinkModel(40e-6, 3e-9)
    times = {str(m): 4 * (link.alpha + m * link.beta) for m in (4096, 65536)}
    fit = fit_link(times, "relay", 4)
    assert fit.alpha == pytest.approx(link.alpha) and fit.beta == pytest.approx(link.beta)


def test_measure_disk_readers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bw = measure_disk_readers((1, 2), size=16 << 20)
    assert set(bw) == {1, 2} and all(v > 1e6 for v in bw.values())
    assert list(tmp_path.iterdir()) == []  # its files are removed


def test_probe_reports_stretch_and_relay() -> None:
    out = mpirun(2, ["-m", "tpi_mpi.perf", "probe-links", "--hidden", "64", "--repeats", "3"], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("PROBE "))[6:])
    assert probe["products_all_s"] > 0 and probe["products_wait_s"] > 0 and probe["products_bytes"] > 1e8
    assert set(probe["relay"]) == {"256", "4096"} and all(v > 0 for v in probe["relay"].values())


def test_fixed_cost_runs_on_one_and_two_ranks(tmp_path: Path) -> None:
    measured = measure_fixed_costs(MPIRUN, tmp_path, world_sizes=(1, 2), repeats=1, prompt_tokens=4, new_tokens=3,
                                   timeout=240)
    raw = measured["raw"]
    assert set(raw["1"]) == {"tp:star", "transformers", "accelerate"}
    assert set(raw["2"]) == {f"tp:{a}" for a in ("star", "ring", "mesh", "tree", "mpi")} | {"pipeline"}
    assert set(raw["2"]["pipeline"]) == {"4"}  # a layer per rank: the 4-layer model only
    assert all(set(v) == {"1", "4"} and all(p["token_s"] > 0 and p["ttft_s"] > 0 for p in v.values())
               for per_n in raw.values() for k, v in per_n.items() if k != "pipeline")
    fits = fit_fixed_costs(measured)
    assert fits[2]["tp:star"].forward(4, prefill=False) > 0 and fits[2]["pipeline"].forward(4, prefill=False) > 0


def test_head_split_spreads_lm_head_and_adds_one_gather() -> None:
    shape = PAPER_SHAPES["Llama 3.1-8B"]  # vocabulary 128256: lm_head is 2 GB in fp32
    link = LinkModel(1e-3, 8 / 300e6)
    links = {"star": link, "bcast": link}
    dev = _device(host_cores=None)
    master = predict_tp(Setting(shape, 8, links=links), dev)
    split = predict_tp(Setting(shape, 8, links=links, head="split"), dev)
    head = shape.vocab * shape.hidden * 4
    assert master.peak_bytes - split.peak_bytes == pytest.approx(head * 7 / 8)
    assert split.peak_bytes_worker - master.peak_bytes_worker == pytest.approx(head / 8)
    gather = link.alpha + 7 * shape.vocab / 8 * 4 * link.beta
    saved = head / dev.weight_bw * 7 / 8
    assert master.token_latency_s - split.token_latency_s == pytest.approx(saved - gather, rel=1e-6)
