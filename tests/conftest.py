"""Shared helpers: every mpirun a test starts has a timeout, and a hang is a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
MPIRUN = str(Path(sys.executable).with_name("mpirun"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def mpirun(n: int, args: list[str], timeout: float = 180, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `mpirun -n N python ARGS`; a run past its timeout fails the test (and is killed)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [MPIRUN, "-n", str(n), sys.executable, *args]
    try:
        return subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun -n {n} {' '.join(args)} hung for {timeout}s:\n{exc.stderr}")


def run_tpi(n: int, overrides: list[str], tmp: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return mpirun(n, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp}/hydra", *overrides], timeout=timeout)
