"""Run every sweep of experiments/sweeps/*.yaml, then calibrate the performance model and draw the figures.

    python -m experiments.run_all                       # all sweeps, figures, summary (make experiments)
    python -m experiments.run_all --sweeps devices,algos --repeats 1 --out results/quick
    python -m experiments.run_all --dry-run             # print the mpirun commands only

A sweep file lists `models` (from experiments/models.yaml) and `runs`; each run is one `mpirun -n N python
-m tpi_mpi.run -m ...` per model and per value of `ranks` (the world size cannot change inside one Hydra
multirun), whose Hydra multirun covers the run's `sweep` lists and the repeats (generation.seed=1..R, which
greedy decoding ignores: a repeat costs no extra start-up; R from the sweep file's `repeats`, --repeats
overrides). Every job appends its run record to OUT/SWEEP/records.jsonl; with --wandb also to wandb (offline
unless logging.wandb_mode says otherwise), grouped by sweep. A sweep whose `requires` (a file under the
repo, or a config key such as memory.window) is missing here is skipped with the reason.
Progress: one line per mpirun and one per job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tpi_mpi.errors import main_guard

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SWEEP_ORDER = ("devices", "links", "algos", "window", "baselines")


def prompt_ids(n: int) -> list[int]:
    # Fixed pseudo-random ids in [3, 500): past the special tokens and inside the tiny vocabulary.
    return [3 + (i * 7919 + 13) % 497 for i in range(n)]


def load_sweeps(names: list[str] | None, sweeps_dir: Path = HERE / "sweeps") -> dict[str, dict[str, Any]]:
    files = {p.stem: p for p in sorted(sweeps_dir.glob("*.yaml"))}
    order = [n for n in SWEEP_ORDER if n in files] + sorted(set(files) - set(SWEEP_ORDER))
    if names:
        unknown = [n for n in names if n not in files]
        if unknown:
            raise SystemExit(f"unknown sweep {unknown[0]!r} in {sweeps_dir}: choose from {', '.join(order)}")
        order = [n for n in order if n in names]
    return {n: yaml.safe_load(files[n].read_text()) for n in order}


def missing_requirement(sweep: dict[str, Any]) -> str | None:
    """The first thing the sweep needs that this checkout lacks, or None."""
    from tpi_mpi import config

    for req in sweep.get("requires", []):
        if "/" in req:
            if not (ROOT / req).exists():
                return f"{req} does not exist in this checkout"
            continue
        section, key = req.split(".", 1)
        cls = {"memory": config.MemoryConfig, "comm": config.CommConfig, "model": config.ModelConfig}.get(section)
        names = {f.name for f in dataclasses.fields(cls)} if cls else set()
        if key not in names:
            return f"the config has no key {req}"
    return None


def ensure_model(out: Path, name: str) -> Path:
    from tpi_mpi.make_model import make_model

    spec = yaml.safe_load((HERE / "models.yaml").read_text())[name]
    path = out / "models" / name
    if not (path / "config.json").is_file():  # make_model renames into place only when complete
        shutil.rmtree(path, ignore_errors=True)
        print(f"making model {name} in {path} ...", file=sys.stderr, flush=True)
        make_model(path, spec["preset"], "llama", spec["layers"], seed=0, dtype="fp32", overrides=spec["set"])
    return path


def ensure_splits(out: Path, model: Path, sizes: set[int]) -> None:
    """Split before the runs, where tpi_mpi.run would look (model.cache_dir): a run that splits on first use
    would count the split's memory in rank 0's peak."""
    from types import SimpleNamespace

    from tpi_mpi.job import shard_dir
    from tpi_mpi.weights.split import split

    cfg = SimpleNamespace(model=SimpleNamespace(shards=None, path=str(model), dtype="auto", ratios=None,
                                                cache_dir=str(out / "shards")))
    for n in sorted(sizes):
        d = shard_dir(cfg, n)
        if not d.is_dir():  # split renames into place only when complete
            print(f"splitting {model.name} for N={n} ...", file=sys.stderr, flush=True)
            split(model, d, n, None, "auto")


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def commands(name: str, sweep: dict[str, Any], out: Path, a: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """(label, command) of every mpirun of the sweep."""
    sweep_dir = out / name
    common = [
        f"prompt_ids=[{','.join(map(str, prompt_ids(a.prompt_tokens)))}]",
        f"generation.max_new_tokens={a.new_tokens}", "generation.stop_on_eos=false", "logging.quiet=true",
        f"output.results={sweep_dir / 'records.jsonl'}", "output.json=null", f"model.cache_dir={out / 'shards'}",
        f"logging.wandb={'true' if a.wandb else 'false'}", f"logging.wandb_group={name}", f"threads={a.threads}",
    ]
    repeats = ",".join(str(i) for i in range(1, (a.repeats or int(sweep.get("repeats", 3))) + 1))
    cmds = []
    i = 0
    for model_name in sweep["models"]:
        model = ensure_model(out, model_name) if not a.dry_run else out / "models" / model_name
        if not a.dry_run:  # N=1 too: baseline=pipeline reads whole layers from the world-size-1 split
            ensure_splits(out, model, {1} | {n for run in sweep["runs"] for n in run["ranks"]})
        for run in sweep["runs"]:
            for n in run["ranks"]:
                i += 1
                over = [f"model.path={model}", *run.get("overrides", [])]
                if run.get("budget_ranks"):
                    over.append(f"accelerate.max_memory={weight_bytes(model) // run['budget_ranks']}")
                    over.append(f"accelerate.offload_folder={out / 'offload'}")
                swept = [f"{k}={v}" for k, v in (run.get("sweep") or {}).items()]
                cmd = [*launch(a), "-n", str(n), sys.executable, "-m", "tpi_mpi.run", "-m", *common, *over, *swept,
                       f"generation.seed={repeats}", f"hydra.sweep.dir={sweep_dir / 'hydra' / f'{i:02d}'}"]
                label = f"{model_name} N={n} {' '.join(run.get('overrides', []) + swept)}".strip()
                cmds.append((label, cmd))
    return cmds


def launch(a: argparse.Namespace) -> list[str]:
    """mpirun and its options: every rank bound to a core (round robin where ranks outnumber cores)."""
    from tpi_mpi.perf.measure import bound_mpirun

    return bound_mpirun(a.mpirun, a.bind_to)


def run_mpirun(cmd: list[str], log: Path, prefix: str, timeout: float) -> int:
    """Run one mpirun; echo each job's summary line as progress, keep everything in the log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT, start_new_session=True)
        assert proc.stderr is not None
        stderr = proc.stderr

        def echo() -> None:  # a thread, so that a silent hang still meets the timeout below
            for line in stderr:
                f.write(line)
                if line.startswith("[tpi_mpi]") or line.startswith("tpi_mpi: error"):
                    print(f"{prefix} {line.rstrip()}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # mpirun and every rank it started
            proc.wait()
            print(f"{prefix} timed out after {timeout:.0f}s", file=sys.stderr, flush=True)
            code = 124
        reader.join(timeout=5)
        return code


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--sweeps", default=None, help="comma-separated (default: all in the sweeps folder)")
    p.add_argument("--sweeps-dir", default=str(HERE / "sweeps"), help="folder of sweep files")
    p.add_argument("--out", default="results/experiments", help="records, models, shards, figures' data")
    p.add_argument("--repeats", type=int, default=None,
                   help="jobs per point (generation.seed=1..R; default: the sweep file's `repeats`, else 3)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank (default 1: a rank is a one-core device; more threads than "
                        "free cores makes OpenMP spin on a loaded machine)")
    p.add_argument("--wandb", action="store_true", help="also log every run to wandb (offline by default)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per mpirun")
    p.add_argument("--mpirun", default=str(Path(sys.executable).with_name("mpirun")))
    p.add_argument("--bind-to", default="core",
                   help="mpirun -bind-to (MPICH's Hydra; Open MPI spells it --bind-to): core pins each rank to a "
                        "core, round robin, as each device has its own; unbound, 4 ranks on 2 cores gave a "
                        "bimodal TTFT (25-33 or 43-50 ms); none: no option")
    p.add_argument("--no-calibrate", action="store_true", help="keep OUT/calibration.json if there is one")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--figures", default="paper_figs/figures", help="where the figures and summary.md go")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    sweeps = load_sweeps(a.sweeps.split(",") if a.sweeps else None, Path(a.sweeps_dir))
    t0 = time.monotonic()
    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": len(os.sched_getaffinity(0)),
                            "loadavg_before": os.getloadavg(), "argv": sys.argv[1:], "sweeps": {}}
    if not a.dry_run and not (a.no_calibrate and (out / "calibration.json").is_file()):
        from tpi_mpi.perf.calibrate import calibrate

        print("calibrating the performance model on this machine ...", file=sys.stderr, flush=True)
        calib = calibrate(launch(a))
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps(calib, indent=1))
    failed = 0
    for name, sweep in sweeps.items():
        why = missing_requirement(sweep)
        if why:
            print(f"[{name}] skipped: {why} (see experiments/sweeps/{name}.yaml)", file=sys.stderr, flush=True)
            meta["sweeps"][name] = {"skipped": why}
            continue
        cmds = commands(name, sweep, out, a)
        if not a.dry_run:
            (out / name / "records.jsonl").unlink(missing_ok=True)  # a sweep's records are from one run
        info = {"title": sweep.get("title"), "loadavg_before": os.getloadavg(), "mpiruns": len(cmds)}
        t1 = time.monotonic()
        for k, (label, cmd) in enumerate(cmds, 1):
            prefix = f"[{name} {k}/{len(cmds)} {time.monotonic() - t0:5.0f}s]"
            print(f"{prefix} {label} (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            if a.dry_run:
                print(" ".join(cmd))
                continue
            code = run_mpirun(cmd, out / name / "log.txt", prefix, a.timeout)
            if code != 0:
                failed += 1
                print(f"{prefix} FAILED with exit code {code}: see {out / name / 'log.txt'}", file=sys.stderr)
        info.update(seconds=time.monotonic() - t1, loadavg_after=os.getloadavg())
        meta["sweeps"][name] = info
    if a.dry_run:
        return 0
    meta["seconds"] = time.monotonic() - t0
    meta["loadavg_after"] = os.getloadavg()
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if not a.no_figures:
        from paper_figs.make_all import main as figures

        figures(["--results", str(out), "--figures", a.figures])
    print(f"done in {time.monotonic() - t0:.0f}s ({failed} mpirun(s) failed); records in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
