"""The performance model's weight formats and wires: bytes per weight, kernel speeds, memory.budget as memplan
plans it, the int8 wire in the allreduce term, and `python -m tpi_mpi.perf paper` over the four formats."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from tpi_mpi.comm.cost_model import LinkModel, WireCost
from tpi_mpi.config import MemoryConfig
from tpi_mpi.perf import kernels, predict
from tpi_mpi.perf.paper import PAPER_SHAPES, PaperAssumptions, paper_device, predict_paper_formats, target_70b
from tpi_mpi.perf.predict import budget_layout, predict_tp
from tpi_mpi.perf.records import device_from, record_format
from tpi_mpi.perf.shapes import Device, Setting, WeightFormat, weight_format
from tpi_mpi.weights import memplan, tensorfile

DEV = Device(flops=50e9, weight_bw=10e9, layer_overhead_s=1e-4, disk_bw=1e9, base_rss=300e6, base_rss_master=350e6,
             host_cores=None)
SHAPE = PAPER_SHAPES["Llama 2-7B"]
FORMATS = ("fp32", "fp16", "int8", "int4-g32", "int4-g64", "int4-g128")


def test_bytes_per_weight_follow_the_kernels_layouts() -> None:
    # int8: one bf16 scale per output row; int4: a bf16 scale and zero per group of G input columns
    assert weight_format("int8").matrix_bytes(100, 64) == 100 * 64 + 2 * 100
    assert weight_format("int4-g32").matrix_bytes(100, 64) == 100 * 64 / 2 + 4 * 100 * 2
    assert weight_format("int4").group_size == 64
    layer = {k: SHAPE.with_format(k).layer_bytes / SHAPE.layer_bytes for k in FORMATS}
    assert layer["fp16"] == pytest.approx(0.5, rel=1e-3)  # norms stay 2 bytes: fp16 checkpoint
    assert layer["int8"] == pytest.approx(1 / 4, rel=1e-3)
    for g in (32, 64, 128):
        assert layer[f"int4-g{g}"] == pytest.approx((0.5 + 4 / g) / 4, rel=1e-3)
    # lm_head quantized with the linear weights, the embedding in the checkpoint's float dtype (fp16)
    int4 = SHAPE.with_format("int4")
    assert int4.head_bytes == pytest.approx(SHAPE.vocab * SHAPE.hidden * (0.5 + 4 / 64))
    assert int4.master_bytes - int4.head_bytes == pytest.approx((SHAPE.vocab + 1) * SHAPE.hidden * 2)
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        weight_format("int3")


def test_formats_rank_by_bytes_where_weights_decide() -> None:
    """Bandwidth-bound (one device reads its weights, fast links): token latency ranks int4 < int8 < fp16 <
    fp32, each near its bytes' share of fp32's."""
    s = Setting(SHAPE, 1)
    t = {k: predict_tp(replace(s, shape=SHAPE.with_format(k)), DEV).token_latency_s for k in FORMATS}
    assert t["int4-g32"] < t["int8"] < t["fp16"] < t["fp32"]
    assert t["int4-g128"] < t["int4-g64"] < t["int4-g32"]
    weights_fp32 = (SHAPE.layers * SHAPE.layer_bytes + SHAPE.head_bytes) / DEV.weight_bw  # lm_head too
    assert t["fp32"] == pytest.approx(weights_fp32, rel=0.02)
    assert t["int8"] == pytest.approx(weights_fp32 / 4, rel=0.05)
    # a slower kernel for a format (bytes/s) slows that format alone, by as much
    slow = replace(DEV, weight_bw_formats={"int8": DEV.weight_bw / 2})
    assert predict_tp(replace(s, shape=SHAPE.with_format("int8")), slow).token_latency_s > 1.9 * t["int8"]
    assert predict_tp(replace(s, shape=SHAPE.with_format("fp16")), slow).token_latency_s == t["fp16"]


def test_budget_streams_what_does_not_fit_and_fewer_bytes_stream_less() -> None:
    budget = 2.5e9  # per rank
    s = Setting(SHAPE, 4, budget=budget, head="split")
    streamed = {k: predict_tp(replace(s, shape=SHAPE.with_format(k)), DEV).streamed_bytes for k in FORMATS[:3]}
    slice_fp32 = SHAPE.layers * SHAPE.layer_bytes / 4
    assert 0 < streamed["fp16"] < streamed["fp32"] < slice_fp32
    assert streamed["int8"] == 0  # 1.6 GB per rank fits with its base, its lm_head rows and the KV cache
    fp32 = predict_tp(s, DEV)
    assert fp32.peak_bytes <= budget and fp32.peak_bytes_worker <= budget
    assert fp32.token_latency_s >= streamed["fp32"] / DEV.disk_bw  # the disk bound
    with pytest.raises(ValueError, match="smallest workable"):
        predict_tp(replace(s, budget=0.5e9), DEV)


def test_budget_layout_is_memplans_plan() -> None:
    """The model's plan of a budget (budget_layout) keeps the blocks resident that weights/memplan.py does."""
    assert (predict.DEFAULT_WINDOW, predict.HEAD_CHUNK_BYTES, predict.READ_CHUNK_BYTES) == (
        memplan.DEFAULT_WINDOW, memplan.HEAD_CHUNK_BYTES, tensorfile.READ_CHUNK_BYTES)
    shape = SHAPE.with_format("int4")
    n = 4
    attn, ffn = round(shape.attn_bytes / n), round(shape.ffn_bytes / n)
    blocks = {(layer, kind): size for layer in range(shape.layers) for kind, size in (("attn", attn), ("ffn", ffn))}
    head = round(shape.head_bytes / n)
    for budget in (0.5e9, 0.8e9, 1.2e9, 2e9):
        s = Setting(shape, n, budget=budget, head="split", prompt_tokens=16, new_tokens=16)
        model = budget_layout(s, DEV, master=False)
        fixed = {"overhead": int(DEV.base_rss), "kv_cache": int(shape.kv_bytes(32, n))}
        plan = memplan.plan_memory(MemoryConfig(resident="auto", budget=int(budget)), blocks, fixed, head)
        assert model.resident_blocks == 2 * shape.layers - len(plan.streamed), budget
        assert model.peak == pytest.approx(plan.predicted_bytes, rel=1e-3), budget


def test_int8_wire_shrinks_the_allreduce_term() -> None:
    """The allreduce's bytes on the paper's links: an int8 wire carries 1.125 bytes a value (1/4 + scales)."""
    link = {"star": LinkModel(1e-3, 8 / 300e6)}
    s = Setting(SHAPE, 8, links=link)
    int8 = replace(s, wire=WireCost(1.125))
    msg_fp32 = 2 * 7 * SHAPE.hidden * 4 * 8 / 300e6  # star: rank 0's link carries 2(N-1) messages
    saved = predict_tp(s, DEV).token_latency_s - predict_tp(int8, DEV).token_latency_s
    assert saved == pytest.approx(2 * SHAPE.layers * msg_fp32 * (1 - 1.125 / 4), rel=1e-3)


def test_record_format_reads_the_split_and_the_dtype() -> None:
    base = {"config": {"model": {"dtype": "auto"}}}
    assert record_format(base) == (WeightFormat("fp32"), 4)
    assert record_format({"config": {"model": {"dtype": "fp16"}}}) == (WeightFormat("fp16"), 2)
    assert record_format({**base, "weights": {"format": "int4", "group_size": 32}}) == (WeightFormat("int4", 32), 4)
    assert record_format({**base, "weights": {"format": "int8", "group_size": None}}) == (WeightFormat("int8"), 4)


def test_calibrated_formats_scale_fp32s_speed_and_the_paper_gets_the_bound_fraction() -> None:
    measured = {"read_bw": 40e9, "formats": {
        "fp32": {"weight_bw": 20e9, "flops": 50e9}, "int8": {"weight_bw": 30e9, "flops": 25e9},
        "int4-g64": {"weight_bw": 44e9, "flops": 40e9}}}
    calib = json.loads(json.dumps({
        "cores": 2, "compute_1_thread": {"flops": 10e9, "weight_bw": 5e9, "layer_overhead_s": 1e-4},
        "disk_bw": 1e9, "base_rss": 3e8, "base_rss_master": 3e8, "formats_1_thread": measured}))
    dev = device_from(calib)
    assert dev.weight_bw_for(WeightFormat()) == 5e9  # fp32: compute_1_thread's, as before
    assert dev.weight_bw_for(WeightFormat("int8")) == pytest.approx(7.5e9)  # 1.5 x fp32's, side by side
    assert dev.flops_for(WeightFormat("int8")) == pytest.approx(5e9)
    assume = PaperAssumptions()
    paper = paper_device(assume, 1e-4, kernels=measured)
    assert paper.weight_bw_for(WeightFormat("fp32")) == pytest.approx(assume.device_weight_bw / 2)
    assert paper.weight_bw_for(WeightFormat("int4", 64)) == assume.device_weight_bw  # capped at the bound


def test_kernels_measure_every_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's kernels run for each format (small shapes here: the real run uses 7B's FFN shape)."""
    monkeypatch.setattr(kernels, "N_OUT", 256)
    monkeypatch.setattr(kernels, "K_IN", 512)
    monkeypatch.setattr(kernels, "MIN_BYTES", 1 << 20)
    for key in ("fp32", "bf16", "int8", "int4-g32", "int4-g128"):
        m = kernels.measure_format(key, threads=1, repeats=2)
        assert m["weight_bw"] > 0 and m["flops"] > 0 and m["matrices"] >= 2
        assert m["bytes_per_weight"] == pytest.approx(weight_format(key).bytes_per_weight(512))


def test_paper_formats_and_the_70b_target() -> None:
    rows = predict_paper_formats(PaperAssumptions(), 1e-3)
    by = {(r["model"], r["format"]): r for r in rows}
    assert set(by) == {(m, f) for m in ("Llama 2-7B", "Llama 2-13B", "Llama 2-70B")
                       for f in ("fp32", "fp16", "int8", "int4-g64")}
    for m in ("Llama 2-13B", "Llama 2-70B"):
        t = [by[m, f]["pred_auto_s"] for f in ("int4-g64", "int8", "fp16", "fp32")]
        assert t == sorted(t), (m, t)
    budget = PaperAssumptions().device_memory
    assert all(r["pred_peak_gb"] * 1e9 <= budget * 1.0001 for r in rows)
    assert by["Llama 2-70B", "fp32"]["paper_s"] == 26.1 and by["Llama 2-70B", "int4-g64"]["paper_s"] is None
    target = target_70b(PaperAssumptions(), 1e-3)
    assert target["met"] == (target["pred_s"] <= 2.6)
    assert target["min_budget_gb"] is not None and target["min_budget_gb"] <= budget / 1e9


def test_paper_cli_prints_the_four_formats() -> None:
    proc = subprocess.run([sys.executable, "-m", "tpi_mpi.perf", "paper"], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| Llama 2-")]
    assert {line.split(" | ")[1] for line in table} == {"fp32", "fp16", "int8", "int4-g64"}
    assert len(table) == 12
    assert "Target: Llama 2-70B int4-g64 on 8 devices <= 2.6 s/token" in proc.stdout
