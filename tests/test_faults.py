"""Faults during generation: a rank killed, a rank stopped. The job ends fast, says who, leaves nothing.

Each test starts a long generation under mpirun, waits until rank 0 has streamed generated text (so the
ranks are in the decode loop), then kills or stops one worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import kill_tree, start_mpirun

from tpi_mpi.make_model import make_model
from tpi_mpi.results import append_jsonl, write_json_atomic
from tpi_mpi.weights.split import split

N = 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=5, overrides={"max_position_embeddings": 4096})
    return {"model": model, "shards": split(model, root / "shards", N)}


class Run:
    """A generation of 4000 tokens (minutes: it never ends by itself within a test) under mpirun."""

    def __init__(self, shards: dict[str, Path], tmp: Path, extra: list[str]):
        self.proc = start_mpirun(N, [
            "-m", "tpi_mpi.run", f"hydra.run.dir={tmp}/hydra", f"model.path={shards['model']}",
            f"model.shards={shards['shards']}", "prompt_ids=[1,40,41]", "generation.max_new_tokens=4000",
            "generation.stop_on_eos=false", f"output.results={tmp}/results.jsonl", f"output.json={tmp}/r.json",
            "threads=1", *extra], env={"TMPDIR": str(self.tmpdir(tmp))})
        self.text: list[str] = []
        self.streaming = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    @staticmethod
    def tmpdir(tmp: Path) -> Path:
        """The ranks' TMPDIR, where the sentinel keeps its marker directory until the job is over."""
        (tmp / "ranks_tmp").mkdir(exist_ok=True)
        return tmp / "ranks_tmp"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while ch := self.proc.stdout.read(1):
            self.text.append(ch)
            if len(self.text) >= 3:  # rank 0 streams generated text: every rank is in the decode loop
                self.streaming.set()

    def processes(self) -> list[psutil.Process]:
        """mpirun, hydra's proxy, the ranks and the sentinel (all below mpirun while it runs)."""
        top = psutil.Process(self.proc.pid)
        return [top, *top.children(recursive=True)]

    def rank(self, r: int) -> psutil.Process:
        for p in self.processes():
            try:
                if p.environ().get("PMI_RANK") == str(r) and "tpi_mpi.run" in " ".join(p.cmdline()):
                    return p
            except psutil.NoSuchProcess:
                pass
        raise AssertionError(f"rank {r} not found")

    def wait(self, timeout: float) -> tuple[float, str]:
        """Seconds until mpirun exits (a failure past `timeout`), and its stderr."""
        t0 = time.monotonic()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
            pytest.fail(f"the job was still running {timeout}s after the fault")
        took = time.monotonic() - t0
        assert self.proc.stderr is not None
        return took, self.proc.stderr.read()

    def wait_with_rank_stopped(self, r: int, timeout: float) -> tuple[float, str]:
        """SIGSTOP rank r, then wait as `wait` does; the rank is resumed if it outlives the job."""
        stopped = self.rank(r)
        stopped.send_signal(signal.SIGSTOP)
        try:
            return self.wait(timeout)
        finally:
            if stopped.is_running():
                stopped.send_signal(signal.SIGCONT)

    def close(self) -> None:
        kill_tree(self.proc)
        self.proc.communicate()


@pytest.fixture
def run(shards: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    runs: list[Run] = []

    def start(*extra: str) -> Run:
        runs.append(Run(shards, tmp_path, list(extra)))
        assert runs[-1].streaming.wait(120), "no generated text within 120 s"
        return runs[-1]

    yield start
    for r in runs:
        r.close()


def assert_nothing_left(procs: list[psutil.Process], tmp: Path) -> None:
    # The sentinel prints its line and exits on its own: give it a moment, bounded.
    gone, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    assert not list(Run.tmpdir(tmp).glob("tpi_mpi-sentinel-*")), "the sentinel's marker directory was left behind"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tpi_mpi: error:")]


def test_killed_rank_is_named_and_every_rank_exits(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Records of earlier runs, which the killed run must leave readable.
    append_jsonl(tmp_path / "results.jsonl", {"run": 1})
    append_jsonl(tmp_path / "results.jsonl", {"run": 2})
    write_json_atomic(tmp_path / "r.json", {"run": 2})
    job = run()
    procs = job.processes()
    victim = job.rank(2)
    victim.send_signal(signal.SIGKILL)
    took, stderr = job.wait(timeout=30)
    assert took < 10, f"the other ranks took {took:.1f}s to exit"
    assert job.proc.returncode != 0
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert f"rank 2 (pid {victim.pid}) died" in errors[0]
    assert "Traceback" not in stderr
    assert_nothing_left(procs, tmp_path)
    assert (tmp_path / "results.jsonl").read_text().splitlines() == ['{"run": 1}', '{"run": 2}']
    assert json.loads((tmp_path / "r.json").read_text()) == {"run": 2}


def test_stalled_rank_trips_the_watchdog(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    timeout_s = 3
    job = run(f"comm.timeout_s={timeout_s}")
    procs = job.processes()
    took, stderr = job.wait_with_rank_stopped(1, timeout=60)
    # timeout + grace (timeout/2) + the thread's poll interval + start-up of the abort: well under 10 s
    assert took < timeout_s + 10, f"the watchdog took {took:.1f}s"
    assert job.proc.returncode != 0
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr[-3000:]
    assert "watchdog: " in errors[0] and f"comm.timeout_s={timeout_s} s" in errors[0]
    assert "rank 1 did not arrive" in errors[0]
    # rank 0 can be in any of a pass's collectives; in the logits' gather (memory.head=split) the ranks that
    # sent their slice are waiting for the next header already: they arrived, only rank 1 is named
    assert any(op in errors[0] for op in ("allreduce #", "bcast of hidden states #", "bcast of the header #",
                                          "gather of the logits #"))
    assert "Traceback" not in stderr
    assert_nothing_left(procs, tmp_path)


def test_stalled_rank_zero_is_reported_by_a_worker(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = run("comm.timeout_s=3")
    procs = job.processes()
    took, stderr = job.wait_with_rank_stopped(0, timeout=60)
    assert took < 3 + 10 and job.proc.returncode != 0
    errors = error_lines(stderr)
    assert errors and "rank 0 did not answer" in errors[0], stderr[-3000:]
    assert_nothing_left(procs, tmp_path)


def test_mpirun_timeout_kills_every_rank() -> None:
    """conftest's mpirun: a run past its timeout fails the test, and no rank survives it."""
    from conftest import mpirun

    marker = f"tpi-hang-{os.getpid()}"
    with pytest.raises(pytest.fail.Exception, match="hung for 3s"):
        mpirun(2, ["-c", f"import time; from mpi4py import MPI; time.sleep(300)  # {marker}"], timeout=3)
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert not left, left


def test_normal_end_leaves_no_sentinel_behind(shards: dict[str, Path], tmp_path: Path) -> None:
    from conftest import mpirun

    proc = mpirun(N, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/hydra", f"model.path={shards['model']}",
                      f"model.shards={shards['shards']}", "prompt_ids=[1,40,41]", "generation.max_new_tokens=4",
                      "output.results=null", "threads=1"], env={"TMPDIR": str(Run.tmpdir(tmp_path))}, timeout=120)
    assert proc.returncode == 0 and "tpi_mpi: error" not in proc.stderr, proc.stderr[-3000:]
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    psutil.wait_procs(left, timeout=5)  # the sentinel exits right after rank 0
    assert not any(p.is_running() for p in left)
    assert not list(Run.tmpdir(tmp_path).glob("tpi_mpi-sentinel-*"))
