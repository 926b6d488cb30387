"""A cut link on emulated devices: how long a generation stalls for an outage, and how fast a cut for good
ends the job, in one run.

    python -m tpi_mpi.bench.cut_link [--devices 3] [--rank 2] [--network wifi] [--timeout-s 10]
        [--outages 0.5,1,2,4] [--workdir bench_out/cut_link]       (root; README "Emulation")

Starts `python -m tpi_mpi.emulate run` of a generation that does not end by itself (tiny model, 2 layers,
comm.algo=star), waits for rank 0's streamed text (every rank is in the decode loop), then, one after the
other, takes rank --rank's link down for each outage (what `emulate cut` and `emulate mend` do, called in
this process so that the times are exact), each time waiting for the text to come again; at the end it
cuts the link for good with `python -m tpi_mpi.emulate cut`. Table: per outage, the time
without text (the outage, plus TCP's retransmission backoff), and the time from the mend until text came
again; for the cut for good, the watchdog's line and the time from the cut until every rank was gone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tpi_mpi.emulate import netns

EMULATE = [sys.executable, "-m", "tpi_mpi.emulate"]


class Streamed:
    """A run whose stdout bytes are time-stamped as they come."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.arrivals: list[float] = []
        self.stderr = b""
        self.new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while self.proc.stdout.read(1):
            with self.new:
                self.arrivals.append(time.monotonic())
                self.new.notify_all()
        with self.new:
            self.new.notify_all()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def text_after(self, t: float, count: int, timeout: float) -> float:
        """The time of the `count`-th byte after time t (a failure past timeout, or if the run ended)."""
        deadline = time.monotonic() + timeout
        with self.new:
            while len([a for a in self.arrivals if a > t]) < count:
                if self.proc.poll() is not None or not self.new.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError(f"no text after {timeout:g} s; run exit {self.proc.poll()}: "
                                       f"{self.stderr.decode()[-2000:]}")
            return [a for a in self.arrivals if a > t][count - 1]

    def last_before(self, t: float) -> float:
        with self.new:
            return max(a for a in self.arrivals if a <= t)


def emulate(*args: str) -> None:
    subprocess.run([*EMULATE, *args], check=True, capture_output=True, timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.cut_link", description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--rank", type=int, default=2, help="whose link is cut (not 0: rank 0 runs the watchdog report)")
    p.add_argument("--network", default="wifi")
    p.add_argument("--timeout-s", type=float, default=10.0, help="comm.timeout_s of the run")
    p.add_argument("--outages", default="0.5,1,2,4", help="seconds, comma-separated; each below --timeout-s")
    p.add_argument("--session", default="tpicut")
    p.add_argument("--workdir", default="bench_out/cut_link")
    args = p.parse_args(argv)
    outages = [float(x) for x in args.outages.split(",") if x]
    work = Path(args.workdir).resolve()
    model, shards = work / "tiny", work / f"shards{args.devices}"
    if not model.exists():
        from tpi_mpi.make_model import make_model

        make_model(model, "tiny", "llama", layers=2, seed=5, overrides={"max_position_embeddings": 8192})
    if not shards.exists():
        from tpi_mpi.weights.split import split

        split(model, shards, args.devices)
    run = Streamed([*EMULATE, "run", f"session={args.session}", f"network={args.network}", "device=paper",
                    f"devices={args.devices}", "--", f"hydra.run.dir={work}/hydra", f"model.path={model}",
                    f"model.shards={shards}", "prompt_ids=[1,40,41]", "generation.max_new_tokens=8000",
                    "generation.stop_on_eos=false", "comm.algo=star", f"comm.timeout_s={args.timeout_s:g}",
                    "output.results=null"])
    load = os.getloadavg()[0]
    rows = []
    try:
        run.text_after(0, 20, 600)
        for outage in outages:  # in-process (what `emulate cut` / `mend` run), so that the times are exact
            netns.set_link(args.session, args.rank, up=False)
            cut = time.monotonic()
            time.sleep(outage)  # the outage itself
            netns.set_link(args.session, args.rank, up=True)
            mended = time.monotonic()
            again = run.text_after(mended, 1, args.timeout_s * 3)
            rows.append((outage, again - run.last_before(cut + 0.3), again - mended))
            run.text_after(again, 20, 60)  # decoding steadily again before the next outage
        ranks = [psutil.Process(int(pid)) for k in range(args.devices) for pid in subprocess.run(
            ["ip", "netns", "pids", netns.rank_ns(args.session, k)], capture_output=True, text=True).stdout.split()]
        emulate("cut", f"session={args.session}", f"rank={args.rank}")
        cut = time.monotonic()
        gone: list[float] = []
        _, alive = psutil.wait_procs(ranks, timeout=args.timeout_s + 60,
                                     callback=lambda _: gone.append(time.monotonic()))
        run.proc.wait(timeout=60)
        ended = time.monotonic()
    finally:
        if run.proc.poll() is None:
            run.proc.terminate()  # `emulate run` stops mpirun and tears the session down
            run.proc.wait(timeout=60)
    errors = [line for line in run.stderr.decode().splitlines() if line.startswith("tpi_mpi: error:")]
    print(f"N={args.devices} network={args.network} rank {args.rank}'s link, comm.timeout_s={args.timeout_s:g} | "
          f"load avg at start {load:.2f}\n")
    print("| outage s | no text for s | text again after the mend, s |\n|---:|---:|---:|")
    for outage, stall, back in rows:
        print(f"| {outage:g} | {stall:.2f} | {back:.2f} |")
    print(f"\ncut for good: every rank gone {max(gone, default=cut) - cut:.1f} s after the cut ({len(alive)} left), "
          f"`emulate run` exited (session down) {ended - cut:.1f} s after it, exit {run.proc.returncode}")
    print("\n".join(errors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
