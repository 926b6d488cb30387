"""What the collective watchdog costs: token latency with it off and on, runs interleaved in one go.

    python -m tpi_mpi.bench.watchdog [--world-size 4] [--preset tiny] [--layers 4] [--new-tokens 64]
        [--repeats 5] [--workdir bench_out/watchdog] [--timeout 600]

Runs `mpirun -n N python -m tpi_mpi.run` alternately with comm.timeout_s=0 (no watchdog thread, no
marks) and comm.timeout_s=60 (the default), --repeats times each, on the same checkpoint and prompt.
Table (medians over the runs): token p50 ms, mean seconds per allreduce call over the ranks (the
watchdog marks every allreduce and broadcast), and the ratio to the watchdog-off row. Also printed: the
in-process CPU time of one mark (`with watchdog(...)`), over 10^6 marks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tpi_mpi.bench.tp_latency import ensure_checkpoint, ensure_split, prompt_ids, run_tpi, warm_page_cache
from tpi_mpi.errors import main_guard


def mark_cost_ns(n: int = 1_000_000) -> float:
    from tpi_mpi.comm.watchdog import Watchdog

    wd = Watchdog(None, None)
    t0 = time.process_time()  # CPU time: on a loaded machine wall time counts the other processes' turns
    for _ in range(n):
        with wd("allreduce", 3, "ffn"):
            pass
    return (time.process_time() - t0) / n * 1e9


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.watchdog", description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default="bench_out/watchdog")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    model = ensure_checkpoint(work, args.preset, args.layers)
    shards = ensure_split(work, model, args.world_size)
    warm_page_cache(shards)
    ids = prompt_ids(args.prompt_tokens)
    rows: dict[str, list[tuple[float, float]]] = {"off (comm.timeout_s=0)": [], "on (comm.timeout_s=60)": []}
    for rep in range(args.repeats):
        for (label, runs), timeout_s in zip(rows.items(), (0, 60), strict=True):
            out = work / "runs" / f"wd{timeout_s}-{rep}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            rec = run_tpi(model, shards, args.world_size, ids, args.new_tokens, out, args.timeout,
                          extra=[f"comm.timeout_s={timeout_s}"])
            per_call = statistics.mean(r["allreduce"]["seconds"] / r["allreduce"]["calls"] for r in rec["ranks"])
            runs.append((rec["token_latency_s"]["p50"], per_call))
            print(f"  {rep + 1}/{args.repeats} {label}: token p50 {runs[-1][0] * 1e3:.2f} ms", file=sys.stderr)
    base = {k: statistics.median(v[k] for v in rows["off (comm.timeout_s=0)"]) for k in (0, 1)}
    print(f"\nN={args.world_size}, {args.preset} with {args.layers} layers, {args.new_tokens} new tokens, "
          f"medians of {args.repeats} runs each, interleaved\n")
    print("| watchdog | token p50 ms | ratio | allreduce us/call | ratio |")
    print("|---|---|---|---|---|")
    for label, runs in rows.items():
        tok, ar = (statistics.median(r[k] for r in runs) for k in (0, 1))
        print(f"| {label} | {tok * 1e3:.2f} | {tok / base[0]:.3f} | {ar * 1e6:.1f} | {ar / base[1]:.3f} |")
    print(f"\none mark (`with watchdog(...)`): {mark_cost_ns():.0f} ns of CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
