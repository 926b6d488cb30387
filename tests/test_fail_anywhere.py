"""A failure at any stage of a job, on a worker or on rank 0, ends every rank within seconds with one line.

TPI_MPI_FAIL_AT=STAGE:RANK (tpi_mpi/faults.py, test only) raises an exception that nothing in tpi_mpi
expects at that stage, standing for any bug or unexpected error there. The time until every process of
the job was gone (mpirun, the ranks, the sentinel: the stderr pipe they share closed) is measured from the
moment of the failure, which the error line carries; `pytest -s` prints the table (docs/reliability.md).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import psutil
import pytest
from conftest import communicate_or_fail, processes_of, start_mpirun

from tpi_mpi.faults import STAGES
from tpi_mpi.make_model import make_model
from tpi_mpi.weights.split import split

N = 2
LIMIT_S = 10  # "within seconds": measured 0.1-2 s on a loaded machine; a hang would be minutes
CASES = [(stage, rank) for stage in STAGES for rank in (0, 1)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fail_anywhere")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=5)
    return {"model": model, "shards": split(model, root / "shards", N)}


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Seconds until every process was gone, per (stage, rank); printed after the module's tests."""
    times: dict[tuple[str, int], float] = {}
    yield times
    if times:
        lines = ["", "| stage | failing rank | s until every process was gone |", "|---|---|---|"]
        lines += [f"| {s} | {'0' if r == 0 else f'{r} (worker)'} | {times[s, r]:.2f} |"
                  for s, r in CASES if (s, r) in times]
        print("\n".join(lines))


@pytest.mark.parametrize("stage,rank", CASES, ids=[f"{s}-rank{r}" for s, r in CASES])
def test_failure_ends_every_rank_with_one_line(tiny: dict[str, Path], tmp_path: Path, table: dict,
                                               no_process_left: str, stage: str, rank: int) -> None:
    ranks_tmp = tmp_path / "ranks_tmp"  # the sentinel's marker directory goes here
    ranks_tmp.mkdir()
    proc = start_mpirun(N, [
        "-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/hydra", f"model.path={tiny['model']}",
        f"model.shards={tiny['shards']}", "prompt_ids=[1,40,41]", "generation.max_new_tokens=4",
        "generation.stop_on_eos=false", f"output.results={tmp_path}/results.jsonl", "threads=1",
    ], env={"TPI_MPI_FAIL_AT": f"{stage}:{rank}", "TMPDIR": str(ranks_tmp)})
    _, err = communicate_or_fail(proc, 180, f"the job after a failure at {stage} on rank {rank}")
    gone = time.time()  # mpirun has exited and every process holding its stderr (the sentinel too)
    assert proc.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith(f"tpi_mpi: error: rank {rank}: InjectedFailure: injected failure at {stage} "
                                f"on rank {rank}"), errors[0]
    assert "Traceback" in err  # an unexpected error is a bug: its traceback is shown, above the line
    failed_at = float(re.search(r"at unix time ([0-9.]+)", errors[0]).group(1))  # type: ignore[union-attr]
    took = gone - failed_at
    assert 0 <= took < LIMIT_S, f"every rank was gone {took:.1f} s after the failure"
    table[stage, rank] = took
    _, alive = psutil.wait_procs(processes_of(no_process_left), timeout=5)
    assert not alive, alive
    assert not list(ranks_tmp.glob("tpi_mpi-sentinel-*")), "the sentinel's marker directory was left behind"
    assert not (tmp_path / "results.jsonl").exists()  # no record of a failed job


def test_uncaught_exception_in_a_helper_thread_ends_every_rank(tmp_path: Path) -> None:
    from conftest import SCRIPTS, mpirun

    proc = mpirun(N, [str(SCRIPTS / "thread_failure.py")], timeout=60)
    gone = time.time()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("tpi_mpi: error: rank 1: ValueError: helper thread failed"), errors[0]
    failed_at = float(re.search(r"at unix time ([0-9.]+)", errors[0]).group(1))  # type: ignore[union-attr]
    assert gone - failed_at < LIMIT_S
