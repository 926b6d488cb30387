"""(e) Tensor parallelism against pipeline, transformers and accelerate across model sizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    COLORS,
    IMPL_LABELS,
    MIB,
    MS,
    group,
    median,
    model_name,
    peak_rss,
    plt,
    records,
    save,
    subtitle,
    token_latency,
)

IMPLS = (None, "pipeline", "transformers", "accelerate")


def make(results: Path, out: Path, meta: dict[str, Any], predict: Any) -> list[Path]:
    recs = records(results, "baselines")
    if not recs:
        return []
    by = group(recs, lambda r: (model_name(r), r.get("baseline")))
    models = [m for m in ("tiny", "small", "medium") if any(k[0] == m for k in by)]
    models += sorted({k[0] for k in by} - set(models))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    width = 0.8 / len(IMPLS)
    x = np.arange(len(models))
    metrics = [("TTFT [ms]", lambda r: r["ttft_s"] * MS), ("token latency p50 [ms]", lambda r: token_latency(r) * MS),
               ("peak RSS of the largest device [MiB]", lambda r: peak_rss(r) / MIB)]
    for ax, (label, f) in zip(axes, metrics, strict=True):
        for i, impl in enumerate(IMPLS):
            vals = [median(by[(m, impl)], f) if (m, impl) in by else 0 for m in models]
            n = next((by[(m, impl)][0]["world_size"] for m in models if (m, impl) in by), 1)
            ax.bar(x + i * width, vals, width, color=COLORS[impl], label=f"{IMPL_LABELS[impl]} (N={n})")
        ax.set_xticks(x + width * (len(IMPLS) - 1) / 2, models)
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("(e) us vs baselines across model sizes; accelerate capped at 1/4 of the weights "
                 f"(the per-device share of 4 TP ranks) | {subtitle(meta, 'baselines')}", fontsize=9)
    return save(fig, out, "fig_baselines")
