"""(b) latency vs links and (d) peak memory vs window: drawn when those sweeps have records (they need the
link emulator and the memory scheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import MIB, MS, group, median, peak_rss, plt, records, save, subtitle, token_latency


def make(results: Path, out: Path, meta: dict[str, Any], predict: Any) -> list[Path]:
    paths: list[Path] = []
    links = records(results, "links")
    if links:
        by = group(links, lambda r: (str(r["config"].get("network", {}).get("description", "?")), r["comm_algo"]))
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = sorted(by)
        ax.bar(range(len(labels)), [median(by[k], token_latency) * MS for k in labels])
        ax.set_xticks(range(len(labels)), [f"{net}\n{algo}" for net, algo in labels], fontsize=7)
        ax.set_ylabel("token latency p50 [ms]")
        fig.suptitle(f"(b) token latency vs emulated links | {subtitle(meta, 'links')}", fontsize=9)
        paths += save(fig, out, "fig_links")
    window = records(results, "window")
    if window:
        by = group(window, lambda r: r["config"]["memory"].get("window") or 0)
        ws = sorted(by)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        axes[0].plot(ws, [median(by[w], peak_rss) / MIB for w in ws], marker="o")
        axes[0].set_ylabel("peak RSS, largest device [MiB]")
        axes[1].plot(ws, [median(by[w], token_latency) * MS for w in ws], marker="o")
        axes[1].set_ylabel("token latency p50 [ms]")
        for ax in axes:
            ax.set_xlabel("memory.window (0 = resident)")
        fig.suptitle(f"(d) peak memory vs window | {subtitle(meta, 'window')}", fontsize=9)
        paths += save(fig, out, "fig_window")
    return paths
