"""What every figure script shares: reading a sweep's records, medians, and saving PNG + PDF."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402

from tpi_mpi.results import read_jsonl  # noqa: E402

MS = 1e3
MIB = 2**20
IMPL_LABELS = {None: "tpi_mpi (tensor parallel)", "pipeline": "pipeline parallel",
               "transformers": "HF transformers", "accelerate": "HF accelerate (disk offload)"}
COLORS = {None: "#1f77b4", "pipeline": "#ff7f0e", "transformers": "#2ca02c", "accelerate": "#d62728"}


def records(results: Path, sweep: str) -> list[dict[str, Any]]:
    path = results / sweep / "records.jsonl"
    return read_jsonl(path) if path.is_file() else []


def model_name(rec: dict[str, Any]) -> str:
    return Path(rec["config"]["model"]["path"]).name


def peak_rss(rec: dict[str, Any]) -> float:
    """The largest device's peak RSS (rank 0 for tensor parallelism: it also holds the embedding and head)."""
    return max(r["peak_rss_bytes"] for r in rec["ranks"])


def token_latency(rec: dict[str, Any]) -> float:
    return rec["token_latency_s"]["p50"]


def group(recs: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in recs:
        out[key(r)].append(r)
    return dict(out)


def median(recs: list[dict[str, Any]], f: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(f(r) for r in recs)


def spread(recs: list[dict[str, Any]], f: Callable[[dict[str, Any]], float]) -> tuple[float, float]:
    """Distance of min and max from the median (for error bars)."""
    vals = [f(r) for r in recs]
    m = statistics.median(vals)
    return m - min(vals), max(vals) - m


def save(fig: Any, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def subtitle(meta: dict[str, Any], sweep: str) -> str:
    info = meta.get("sweeps", {}).get(sweep, {})
    load = info.get("loadavg_before")
    return f"{meta.get('cores', '?')} cores shared by all ranks" + (f", load avg {load[0]:.1f}" if load else "")


def network_name(r: dict[str, Any]) -> str:
    """The network profile of a record (`network=NAME`), or "" where it ran without one."""
    return str(r.get("network") or (r["config"].get("emulation") or {}).get("network") or "")
