"""`python -m tpi_mpi.perf calibrate|paper|probe-links`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpi_mpi.errors import main_guard
from tpi_mpi.perf.calibrate import calibrate, probe_links_rank
from tpi_mpi.perf.measure import bound_mpirun, fit_fixed_costs
from tpi_mpi.perf.paper import PaperAssumptions, predict_paper


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.perf", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate", help="measure this machine (~30 s) and write the calibration as JSON")
    c.add_argument("--out", default="calibration.json")
    c.add_argument("--mpirun", default=str(Path(sys.executable).with_name("mpirun")))
    c.add_argument("--bind-to", default="core",
                   help="mpirun -bind-to for the runs (as experiments.run_all: core); none: no binding")
    pp = sub.add_parser("paper", help="predict the paper's settings next to its reported numbers")
    pp.add_argument("--calibration", default=None,
                    help="for the fixed costs of one process (default: 1 ms per layer)")
    pl = sub.add_parser("probe-links", help=argparse.SUPPRESS)
    pl.add_argument("--hidden", type=int, default=1024)
    pl.add_argument("--repeats", type=int, default=40)
    a = p.parse_args(argv)
    if a.cmd == "probe-links":
        probe_links_rank(a.hidden, a.repeats)
        return 0
    if a.cmd == "calibrate":
        calib = calibrate(bound_mpirun(a.mpirun, a.bind_to))
        from tpi_mpi.results import write_json_atomic

        write_json_atomic(a.out, calib)
        print(json.dumps({k: v for k, v in calib.items() if k != "links"}, indent=1))
        return 0
    overhead, fixed = 1e-3, None
    if a.calibration:
        calib = json.loads(Path(a.calibration).read_text())
        overhead = calib["compute_1_thread"]["layer_overhead_s"]
        fixed = fit_fixed_costs(calib["fixed_costs"]).get(1) if "fixed_costs" in calib else None
    for row in predict_paper(PaperAssumptions(), overhead, fixed):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
