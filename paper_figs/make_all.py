"""All figures and tables from one run of the sweeps (python -m experiments.run_all writes the records).

    python -m paper_figs.make_all [--results results/experiments] [--figures paper_figs/figures]   # make figures

Writes FIGURES/fig_*.png and .pdf and FIGURES/summary.md (the tables: us vs baselines with ratios, the
performance model's error per point, its predictions of the paper's settings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tpi_mpi.errors import main_guard

from . import fig_algos, fig_baselines, fig_devices, fig_extra, fig_perfmodel, tables

SCRIPTS = (fig_devices, fig_algos, fig_baselines, fig_extra, fig_perfmodel)


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m paper_figs.make_all", description=__doc__.splitlines()[0])
    p.add_argument("--results", default="results/experiments")
    p.add_argument("--figures", default="paper_figs/figures")
    a = p.parse_args(argv)
    results, out = Path(a.results), Path(a.figures)
    if not results.is_dir():
        raise SystemExit(f"{results} does not exist: run python -m experiments.run_all first (make experiments)")
    meta: dict[str, Any] = json.loads((results / "meta.json").read_text()) if (results / "meta.json").is_file() else {}
    calib_path = results / "calibration.json"
    predict = None
    overhead, fixed = 1e-3, None
    calib: dict[str, Any] | None = None
    if calib_path.is_file():
        from tpi_mpi.perf.measure import fit_fixed_costs
        from tpi_mpi.perf.records import predict_record

        calib = json.loads(calib_path.read_text())
        overhead = calib["compute_1_thread"]["layer_overhead_s"]
        fixed = fit_fixed_costs(calib["fixed_costs"]).get(1) if "fixed_costs" in calib else None

        def predict(rec: dict[str, Any]) -> Any:
            return predict_record(rec, calib)

    made = []
    for script in SCRIPTS:
        made += script.make(results, out, meta, predict)
    load = [meta.get(k, [float("nan")])[0] for k in ("loadavg_before", "loadavg_after")]
    summary = ["# Results summary", "", f"Records: `{results}`; machine: {meta.get('cores', '?')} cores; "
               f"1-min load average before/after: {load[0]:.1f} / {load[1]:.1f}; total "
               f"{meta.get('seconds', 0):.0f} s.", "",
               "## Tensor parallelism vs baselines", "", tables.baselines_table(results)]
    if predict is not None:
        summary += ["## Performance model vs measured points", "", tables.validation_table(results, predict)]
    summary += ["## Performance model: the paper's settings", "", tables.paper_table(overhead, fixed)]
    summary += ["## Performance model: the paper's 8 devices per weight format", "",
                tables.paper_formats_table(overhead, fixed, calib)]
    skipped = {k: v["skipped"] for k, v in meta.get("sweeps", {}).items() if "skipped" in v}
    if skipped:
        summary += ["## Sweeps not run here", ""] + [f"- {k}: {v}" for k, v in skipped.items()] + [""]
    text = "\n".join(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text)
    print(text)
    print("figures: " + ", ".join(str(p) for p in made if p.suffix == ".png"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
