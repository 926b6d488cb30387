"""Shared helpers: every mpirun a test starts has a timeout, and a hang is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
MPIRUN = str(Path(sys.executable).with_name("mpirun"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL mpirun and every process below it. Not just its process group: hydra starts each rank
    in a session of its own (setsid), so killing mpirun's group would leave the ranks running."""
    try:
        top = psutil.Process(proc.pid)
        procs = [*top.children(recursive=True), top]  # collected first: once mpirun dies they are orphans
    except psutil.NoSuchProcess:
        return
    # tpi_mpi's sentinel exits by itself once the ranks are gone, removing its marker directory.
    sentinels = [p for p in procs if _is_sentinel(p)]
    for p in procs:
        if p not in sentinels:
            _kill(p)
    psutil.wait_procs([p for p in procs[:-1] if p not in sentinels], timeout=10)
    for p in psutil.wait_procs(sentinels, timeout=5)[1]:
        _kill(p)


def _is_sentinel(p: psutil.Process) -> bool:
    try:
        return "tpi_mpi.comm.sentinel" in p.cmdline()
    except psutil.Error:
        return False


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass


def start_mpirun(n: int, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
                 stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    """Start `mpirun -n N python ARGS` in a session of its own (the caller must wait with a timeout)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([MPIRUN, "-n", str(n), sys.executable, *args], cwd=cwd or ROOT, env=full_env,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def mpirun(n: int, args: list[str], timeout: float = 180, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `mpirun -n N python ARGS`; a run past its timeout fails the test, and it and every rank are killed."""
    with start_mpirun(n, args, cwd, env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            out, err = proc.communicate()
            pytest.fail(f"mpirun -n {n} {' '.join(args)} hung for {timeout}s:\n{err[-3000:]}")
        finally:
            if proc.poll() is None:  # interrupted otherwise (Ctrl-C in pytest): leave nothing running
                kill_tree(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_tpi(n: int, overrides: list[str], tmp: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return mpirun(n, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp}/hydra", *overrides], timeout=timeout)
