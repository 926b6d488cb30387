"""(b) latency vs links and (d) peak memory vs window: drawn when those sweeps have records (they need the
link emulator and the memory scheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import MIB, MS, group, median, network_name, peak_rss, plt, records, save, subtitle, token_latency


def make(results: Path, out: Path, meta: dict[str, Any], predict: Any) -> list[Path]:
    paths: list[Path] = []
    links = records(results, "links")
    if links:
        by = group(links, lambda r: (network_name(r), r["comm_algo"]))
        nets = [n for n in ("ethernet", "paper", "wifi", "4g") if any(k[0] == n for k in by)]
        nets += sorted({k[0] for k in by} - set(nets))
        algos = sorted({k[1] for k in by})
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        width = 0.8 / len(algos)
        for ax, (label, f) in zip(axes, [("token latency p50 [ms]", lambda r: token_latency(r) * MS),
                                         ("TTFT [ms]", lambda r: r["ttft_s"] * MS)], strict=True):
            for i, algo in enumerate(algos):
                vals = [median(by[(n, algo)], f) if (n, algo) in by else 0 for n in nets]
                ax.bar([j + i * width for j in range(len(nets))], vals, width, label=algo)
                if predict is not None:
                    key = "token_latency_s" if label.startswith("token") else "ttft_s"
                    ax.scatter([j + i * width for j in range(len(nets)) if (nets[j], algo) in by],
                               [getattr(predict(by[(n, algo)][0]), key) * MS for n in nets if (n, algo) in by],
                               color="k", marker="x", zorder=3, label="model" if i == 0 else None)
            ax.set_xticks([j + width * (len(algos) - 1) / 2 for j in range(len(nets))], nets)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        n, model = links[0]["world_size"], Path(links[0]["config"]["model"]["path"]).name
        fig.suptitle(f"(b) emulated links (software model), N={n}, model '{model}' | {subtitle(meta, 'links')}",
                     fontsize=9)
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
