"""A measured run record predicted from a calibration (what `make figures` compares)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from tpi_mpi.comm.cost_model import FP32_WIRE, LinkModel, WireCost
from tpi_mpi.comm.wire import AUTO_WIRES, WIRE_DTYPES, WireFormat
from tpi_mpi.perf.measure import fit_fixed_costs
from tpi_mpi.perf.predict import predict_accelerate, predict_pipeline, predict_tp, predict_transformers
from tpi_mpi.perf.shapes import FLOAT_BYTES, FP32, Device, ModelShape, Prediction, Setting, WeightFormat


def device_from(calib: dict[str, Any]) -> Device:
    """A rank of the sweeps: one torch thread (experiments.run_all runs them with threads=1). Weight formats
    other than fp32 run at fp32's measured speed times their kernel's speed relative to fp32's kernel,
    measured side by side (formats_1_thread), so that the fp32 figures stay those of compute_1_thread."""
    c = calib["compute_1_thread"]
    o = calib.get("overheads", {})
    bw_formats = prefill_formats = None
    if "formats_1_thread" in calib:
        bw_ratio, prefill_formats = format_ratios(calib["formats_1_thread"])
        bw_formats = {k: c["weight_bw"] * r for k, r in bw_ratio.items()}
    return Device(flops=c["flops"], weight_bw=c["weight_bw"],
                  weight_bw_formats=bw_formats, prefill_speed_formats=prefill_formats,
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


def format_ratios(measured: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """From perf.kernels.measure_formats(...): each format's decode bytes/s and prefill FLOP/s relative to
    fp32's kernel in the same run."""
    f = measured["formats"]
    return ({k: v["weight_bw"] / f["fp32"]["weight_bw"] for k, v in f.items()},
            {k: v["flops"] / f["fp32"]["flops"] for k, v in f.items()})


def record_format(record: dict[str, Any]) -> tuple[WeightFormat, int]:
    """The linear weights' format of a run record and the bytes of its float tensors: the split's
    quantization where the record has one (`weights`: format, group_size), else model.dtype (auto: fp32)."""
    weights = record.get("weights") or {}
    dtype = str(record["config"]["model"].get("dtype") or "auto")
    float_bytes = FLOAT_BYTES.get(dtype, FP32)
    fmt = weights.get("format")
    if fmt == "int8":
        return WeightFormat("int8"), float_bytes
    if fmt == "int4":
        return WeightFormat("int4", int(weights["group_size"])), float_bytes
    return (WeightFormat(dtype) if dtype in FLOAT_BYTES else WeightFormat()), float_bytes


def _int_keys(table: dict[str, float] | None) -> dict[int, float] | None:
    return {int(k): float(v) for k, v in table.items()} if table else None


def wire_costs(calib: dict[str, Any]) -> dict[str, WireCost]:
    """Each wire format's bytes per value and encode/decode seconds per value, as calibrated (older
    calibrations: bytes only, no encoding cost)."""
    if "wire_codecs" in calib:
        return {k: WireCost(**v) for k, v in calib["wire_codecs"].items()}
    return {k: WireCost(WireFormat(k).nbytes(8192) / 8192) for k in WIRE_DTYPES}


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
    shape = ModelShape.from_hf_config(json.loads((Path(cfg["model"]["path"]) / "config.json").read_text()),
                                      *record_format(record))
    n = record["world_size"]
    algo = cfg["comm"]["algo"]
    mem = cfg.get("memory", {})
    window = mem.get("window") if mem.get("resident") is False else None
    emulated = None
    if (cfg.get("emulation") or {}).get("links") == "software" and cfg.get("network"):
        link = cfg["network"]["default"]  # the network=NAME profile as the run resolved it
        emulated = LinkModel(link["latency_s"], 8 / link["bandwidth_bit_s"])
    head = str(mem.get("head") or "master")  # absent in records from before the split: master
    budget = None
    if mem.get("resident") == "auto" and mem.get("budget") not in (None, "cgroup"):
        from tpi_mpi.units import parse_size

        budget = float(parse_size(mem["budget"], "memory.budget", "1.5GB"))
    wire = str(cfg["comm"].get("dtype") or "fp32")
    codecs = wire_costs(calib)
    s = Setting(shape, n, record["prompt_tokens"], record["generated_tokens"], algo,
                window=window if window is None else int(window),
                links=links_from(calib, n, beta_from_smallest="fixed_costs" in calib), emulated=emulated,
                head=head, budget=budget, wire=codecs.get(wire, FP32_WIRE),
                wire_choice={w: codecs[w] for w in AUTO_WIRES if w in codecs} if wire == "auto" else None)
    dev = device_from(calib)
    baseline = record.get("baseline")
    if baseline == "transformers":
        return predict_transformers(s, dev)
    if baseline == "accelerate":
        from tpi_mpi.config import size_bytes

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
