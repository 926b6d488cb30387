"""(a) TTFT and token latency against the number of devices, measured and predicted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import MIB, MS, group, median, peak_rss, plt, records, save, spread, subtitle, token_latency


def make(results: Path, out: Path, meta: dict[str, Any], predict: Any) -> list[Path]:
    recs = [r for r in records(results, "devices") if not r.get("baseline")]
    if not recs:
        return []
    by_n = group(recs, lambda r: r["world_size"])
    ns = sorted(by_n)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (label, f) in zip(axes[:2], [("TTFT", lambda r: r["ttft_s"] * MS),
                                         ("token latency (p50)", lambda r: token_latency(r) * MS)], strict=True):
        ax.errorbar(ns, [median(by_n[n], f) for n in ns], yerr=list(zip(*[spread(by_n[n], f) for n in ns],
                                                                         strict=True)),
                    marker="o", capsize=3, label="measured (median, min-max)")
        if predict is not None:
            key = "ttft_s" if label == "TTFT" else "token_latency_s"
            ax.plot(ns, [getattr(predict(by_n[n][0]), key) * MS for n in ns], "k--", marker="x",
                    label="performance model")
        ax.set_xlabel("devices (MPI ranks)")
        ax.set_ylabel(f"{label} [ms]")
        ax.set_xticks(ns)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(ns, [median(by_n[n], peak_rss) / MIB for n in ns], marker="o", label="largest rank (rank 0)")
    ax.plot(ns, [median(by_n[n], lambda r: min(x["peak_rss_bytes"] for x in r["ranks"])) / MIB for n in ns],
            marker="s", label="smallest rank")
    ax.set_xlabel("devices (MPI ranks)")
    ax.set_ylabel("peak RSS per device [MiB]")
    ax.set_xticks(ns)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    model = Path(recs[0]["config"]["model"]["path"]).name
    fig.suptitle(f"(a) tensor parallelism vs number of devices: model '{model}', star allreduce | "
                 f"{subtitle(meta, 'devices')}", fontsize=9)
    return save(fig, out, "fig_devices")
