"""Markdown tables from a run of the sweeps: us vs the baselines (with ratios), the performance model's
error per measured point, and its predictions of the paper's settings next to the paper's numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import MIB, MS, group, median, model_name, peak_rss, records, token_latency
from .fig_perfmodel import validation_rows

IMPLS = ((None, "tpi_mpi TP"), ("pipeline", "pipeline"), ("transformers", "transformers"),
         ("accelerate", "accelerate"))


def baselines_table(results: Path) -> str:
    by = group(records(results, "baselines"), lambda r: (model_name(r), r.get("baseline")))
    if not by:
        return "(no baselines records)\n"
    models = [m for m in ("tiny", "small", "medium") if any(k[0] == m for k in by)]
    lines = ["| model | implementation | N | TTFT ms | token p50 ms | peak RSS MiB (largest device) | "
             "TP TTFT / this | TP token / this | TP peak / this |", "|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        tp = by.get((m, None))
        for impl, label in IMPLS:
            recs = by.get((m, impl))
            if not recs:
                continue
            ttft, tok, peak = (median(recs, lambda r: r["ttft_s"]) * MS, median(recs, token_latency) * MS,
                               median(recs, peak_rss) / MIB)
            ratios = ["—"] * 3
            if tp and impl is not None:
                ratios = [f"{median(tp, lambda r: r['ttft_s']) * MS / ttft:.2f}",
                          f"{median(tp, token_latency) * MS / tok:.2f}", f"{median(tp, peak_rss) / MIB / peak:.2f}"]
            lines.append(f"| {m} | {label} | {recs[0]['world_size']} | {ttft:.1f} | {tok:.1f} | {peak:.0f} | "
                         + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def validation_table(results: Path, predict: Any) -> str:
    rows = validation_rows(results, predict)
    if not rows:
        return "(no records to validate against)\n"
    lines = ["| sweep | model | N | impl | algo | TTFT ms meas / pred (err) | token ms meas / pred (err) | "
             "peak MiB meas / pred (err) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m]:.1f} / {r[f'pred_{m}']:.1f} ({r[f'err_{m}']:+.0%})" for m in ("ttft_ms", "tok_ms", "peak_mib")]
        lines.append(f"| {r['sweep']} | {r['model']} | {r['n']} | {r['impl']} | {r['algo'] or '—'} | "
                     + " | ".join(cells) + " |")
    n = len(rows)
    within = {m: sum(abs(r[f"err_{m}"]) <= 0.25 for r in rows) for m in ("ttft_ms", "tok_ms", "peak_mib")}
    lines.append(f"\nWithin 25 %: TTFT {within['ttft_ms']}/{n}, token latency {within['tok_ms']}/{n}, "
                 f"peak memory {within['peak_mib']}/{n} points.")
    return "\n".join(lines) + "\n"


def paper_table(layer_overhead_s: float, fixed: Any = None) -> str:
    from tpi_mpi.perf.paper import PaperAssumptions, predict_paper

    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "—" if v is None else fmt.format(v)

    a = PaperAssumptions()
    lines = [f"Assumed per device: {a.device_flops / 1e9:.0f} GFLOP/s, {a.device_weight_bw / 1e9:.0f} GB/s through "
             f"matrix-vector products, disk {a.disk_bw / 1e9:.1f} GB/s, window {a.window}; links "
             f"{a.latency_s * 1e3:.0f} ms / {a.bandwidth_bit_s / 1e6:.0f} Mbit/s (8 devices) and 3 ms / 100 Mbit/s "
             f"(4 laptops, Wi-Fi); fp32 weights; Transformers and Accelerate on one device with "
             f"{a.memory / 1e9:.0f} GB.", "",
             "| model | TP 8 dev. s/token pred / paper | TP 4 laptops Wi-Fi pred / paper | transformers pred / paper "
             "| accelerate pred / paper | TTFT 8 dev. pred s | peak GB 8 dev. pred rank 0 / others / paper |",
             "|---|---|---|---|---|---|---|"]
    for r in predict_paper(a, layer_overhead_s, fixed):
        lines.append(f"| {r['model']} | {f(r['pred_tpi_8_s'])} / {f(r['paper_tpi_8_s'], '{:.0f}')} | "
                     f"{f(r['pred_tpi_4_wifi_s'])} / {f(r['paper_tpi_4_wifi_s'], '{:.0f}')} | "
                     f"{f(r['pred_transformers_s'])} / {f(r['paper_transformers_s'], '{:.0f}')} | "
                     f"{f(r['pred_accelerate_s'])} / {f(r['paper_accelerate_s'], '{:.0f}')} | "
                     f"{f(r['pred_ttft_8_s'])} | {f(r['pred_peak_gb_8'])} / {f(r['pred_peak_worker_gb_8'])} / "
                     f"{f(r['paper_peak_gb_8'])} |")
    return "\n".join(lines) + "\n"


def paper_formats_table(layer_overhead_s: float, fixed: Any = None, calib: dict[str, Any] | None = None) -> str:
    """The paper's 8-device setting per weight format (perf.paper.predict_paper_formats) and the 70B target."""
    from tpi_mpi.perf.paper import PaperAssumptions, formats_table, predict_paper_formats, target_70b
    from tpi_mpi.perf.records import wire_costs

    kernels = (calib or {}).get("formats_all_cores")
    codecs = wire_costs(calib) if calib and "wire_codecs" in calib else None
    a = PaperAssumptions()
    rows = predict_paper_formats(a, layer_overhead_s, fixed, kernels, codecs)
    return formats_table(rows, target_70b(a, layer_overhead_s, fixed, kernels, codecs))
