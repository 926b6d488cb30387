"""The performance model against every measured sweep point: predicted vs measured, with the ±25 % band."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import (
    COLORS,
    IMPL_LABELS,
    MIB,
    MS,
    median,
    model_name,
    network_name,
    peak_rss,
    plt,
    records,
    save,
    token_latency,
)

SWEEPS = ("devices", "algos", "baselines", "links", "window")


def point_key(sweep: str, r: dict[str, Any]) -> tuple[Any, ...]:
    cfg = r["config"]
    return (sweep, model_name(r), r["world_size"], r.get("baseline"), r.get("comm_algo"),
            cfg.get("memory", {}).get("window"), network_name(r))


def validation_rows(results: Path, predict: Any) -> list[dict[str, Any]]:
    """One row per measured point (median over its repeats) with the model's prediction and the error."""
    rows = []
    seen = set()
    for sweep in SWEEPS:
        points: dict[Any, list[dict[str, Any]]] = {}
        for r in records(results, sweep):
            points.setdefault(point_key(sweep, r), []).append(r)
        for key, recs in points.items():
            if key[1:] in seen:  # the same point measured by two sweeps: keep the first
                continue
            seen.add(key[1:])
            pred = predict(recs[0])
            row = {"sweep": key[0], "model": key[1], "n": key[2], "impl": key[3] or "tp",
                   "algo": key[4] if not key[6] else f"{key[4]} {key[6]}",
                   "ttft_ms": median(recs, lambda r: r["ttft_s"]) * MS, "pred_ttft_ms": pred.ttft_s * MS,
                   "tok_ms": median(recs, token_latency) * MS, "pred_tok_ms": pred.token_latency_s * MS,
                   "peak_mib": median(recs, peak_rss) / MIB, "pred_peak_mib": pred.peak_bytes / MIB}
            for m in ("ttft_ms", "tok_ms", "peak_mib"):
                row[f"err_{m}"] = (row[f"pred_{m}"] - row[m]) / row[m]
            rows.append(row)
    return rows


def make(results: Path, out: Path, meta: dict[str, Any], predict: Any) -> list[Path]:
    if predict is None:
        return []
    rows = validation_rows(results, predict)
    if not rows:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (m, label) in zip(axes, [("ttft_ms", "TTFT [ms]"), ("tok_ms", "token latency [ms]"),
                                     ("peak_mib", "peak RSS, largest device [MiB]")], strict=True):
        for impl, key in (("tp", None), ("pipeline", "pipeline"), ("transformers", "transformers"),
                          ("accelerate", "accelerate")):
            pts = [r for r in rows if r["impl"] == impl]
            if pts:
                ax.scatter([r[m] for r in pts], [r[f"pred_{m}"] for r in pts], color=COLORS[key],
                           label=IMPL_LABELS[key], s=18)
        lo = min(min(r[m], r[f"pred_{m}"]) for r in rows) * 0.8
        hi = max(max(r[m], r[f"pred_{m}"]) for r in rows) * 1.25
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.75, hi * 0.75], [lo * 1.25, hi * 1.25], color="grey", alpha=0.2,
                        label="±25 %")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {label}")
        ax.set_ylabel(f"predicted {label}")
        within = sum(abs(r[f"err_{m}"]) <= 0.25 for r in rows)
        ax.set_title(f"{within}/{len(rows)} points within 25 %", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("performance model (calibrated on this machine) vs every measured sweep point", fontsize=9)
    return save(fig, out, "fig_perfmodel")
