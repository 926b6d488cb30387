"""(c) Token latency and TTFT per allreduce algorithm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import MS, group, median, plt, records, save, subtitle, token_latency

ORDER = ("star", "ring", "mesh", "tree", "mpi", "auto")


def make(results: Path, out: Path, meta: dict[str, Any], predict: Any) -> list[Path]:
    recs = records(results, "algos")
    if not recs:
        return []
    by = group(recs, lambda r: (r["world_size"], r["comm_algo"]))
    ns = sorted({n for n, _ in by})
    algos = [a for a in ORDER if any(a == k[1] for k in by)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(ns)
    x = np.arange(len(algos))
    for ax, (label, f) in zip(axes, [("token latency (p50)", lambda r: token_latency(r) * MS),
                                     ("TTFT", lambda r: r["ttft_s"] * MS)], strict=True):
        for i, n in enumerate(ns):
            vals = [median(by[(n, a)], f) if (n, a) in by else 0 for a in algos]
            ax.bar(x + i * width, vals, width, label=f"N={n}")
        ax.set_xticks(x + width * (len(ns) - 1) / 2, algos)
        ax.set_ylabel(f"{label} [ms]")
        ax.legend(fontsize=8)
    model = Path(recs[0]["config"]["model"]["path"]).name
    fig.suptitle(f"(c) allreduce algorithms, model '{model}' (shared memory, no shaped links) | "
                 f"{subtitle(meta, 'algos')}", fontsize=9)
    return save(fig, out, "fig_algos")
