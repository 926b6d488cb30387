"""`python -m tpi_mpi.perf calibrate|paper|kernels|probe-links`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tpi_mpi.errors import main_guard
from tpi_mpi.perf.calibrate import calibrate, probe_links_rank
from tpi_mpi.perf.measure import bound_mpirun, fit_fixed_costs
from tpi_mpi.perf.paper import (
    PAPER_FORMATS,
    PaperAssumptions,
    formats_table,
    predict_paper,
    predict_paper_formats,
    target_70b,
)


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
                    help="for the fixed costs of one process (default: 1 ms per layer), the weight formats' "
                         "kernel speeds (formats_all_cores) and the wire formats' encoding costs")
    pp.add_argument("--kernels", default=None,
                    help="the weight formats' kernel speeds from `kernels --out FILE` (instead of the calibration's)")
    pp.add_argument("--formats", default=",".join(PAPER_FORMATS),
                    help="weight formats of the second table (fp32, fp16, bf16, int8, int4, int4-gG)")
    k = sub.add_parser("kernels", help="measure each weight format's kernel (decode bytes/s, prefill FLOP/s) and "
                                       "the read bandwidth beside them, as calibrate does")
    k.add_argument("--out", default="kernels.json")
    k.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
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
    if a.cmd == "kernels":
        import os

        from tpi_mpi.perf.kernels import measure_formats
        from tpi_mpi.results import write_json_atomic

        measured = measure_formats(a.threads or len(os.sched_getaffinity(0)))
        measured["loadavg"] = os.getloadavg()
        write_json_atomic(a.out, measured)
        print(json.dumps(measured, indent=1))
        return 0
    overhead, fixed, kernels, codecs = 1e-3, None, None, None
    if a.calibration:
        from tpi_mpi.perf.records import wire_costs

        calib = json.loads(Path(a.calibration).read_text())
        overhead = calib["compute_1_thread"]["layer_overhead_s"]
        fixed = fit_fixed_costs(calib["fixed_costs"]).get(1) if "fixed_costs" in calib else None
        kernels = calib.get("formats_all_cores")
        codecs = wire_costs(calib) if "wire_codecs" in calib else None
    if a.kernels:
        kernels = json.loads(Path(a.kernels).read_text())
    assume = PaperAssumptions()
    for row in predict_paper(assume, overhead, fixed):
        print(json.dumps(row))
    formats = tuple(a.formats.split(","))
    rows = predict_paper_formats(assume, overhead, fixed, kernels, codecs, formats)
    for row in rows:
        print(json.dumps(row))
    target = target_70b(assume, overhead, fixed, kernels, codecs)
    print(json.dumps({"target": target}))
    print(f"\nWeight formats on the paper's 8 devices (memory.budget {assume.device_memory / 2**30:.0f} GiB each, "
          f"links {assume.latency_s * 1e3:.0f} ms / {assume.bandwidth_bit_s / 1e6:.0f} Mbit/s, disk "
          f"{assume.disk_bw / 1e9:.0f} GB/s, memory.head=split; kernels "
          f"{'at the fraction of the memory bound measured here' if kernels else 'at the memory bound'}):\n")
    print(formats_table(rows, target), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
