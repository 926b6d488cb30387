"""A measured run record predicted from a calibration (what `make figures` compares)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from tpi_mpi.comm.cost_model import LinkModel
from tpi_mpi.perf.measure import fit_fixed_costs
from tpi_mpi.perf.predict import predict_accelerate, predict_pipeline, predict_tp, predict_transformers
from tpi_mpi.perf.shapes import FP32, Device, ModelShape, Prediction, Setting


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
