"""slurm/*.sbatch submitted for real to a single-node Slurm cluster started on 127.0.0.1 for this module.

The cluster (tpi_mpi/cluster/local_slurm.py) has its own munge key and socket, config, state and logs in a temp
dir; it is stopped and removed afterwards, also when a test fails. Without root or slurm-wlm/munge the
tests skip with the reason. Every sbatch runs with --wait and a timeout: a hang fails with the queue,
node state and daemon logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

from tpi_mpi.cluster.local_slurm import NODE, LocalSlurm, missing_requirement
from tpi_mpi.make_model import make_model
from tpi_mpi.results import read_jsonl
from tpi_mpi.weights.split import split

IDS = [1, 40, 41, 300, 7]
NEW = 6
JOB_TIMEOUT = 300  # s for one sbatch --wait; a 4-rank job took 163 s here under load 22 (docs/slurm_docker.md)

pytestmark = pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalSlurm]:
    # A short path: the munge socket path must fit in a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="tpi-slurm-"))
    slurm = LocalSlurm(root)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
    assert not root.exists() and not slurm.leftover_pids()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slurm")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=5)
    return {"root": root, "model": model, "shards2": split(model, root / "shards2", 2),
            "shards4": split(model, root / "shards4", 4)}


@pytest.fixture(scope="module")
def reference(tiny: dict[str, Path]) -> list[int]:
    """Hugging Face greedy continuation of IDS: what every Slurm run must generate."""
    model = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32).eval()
    x = torch.tensor([IDS])
    with torch.no_grad():
        for _ in range(NEW):
            x = torch.cat([x, model(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x[0, len(IDS):].tolist()


def sbatch(slurm: LocalSlurm, script: str, tmp: Path, variables: dict[str, str],
           options: list[str]) -> tuple[int, str, str]:
    """Submit slurm/SCRIPT as a user would (from the repo root, variables via the environment) and wait.

    Returns (exit code, job id, the job's output files). A job past JOB_TIMEOUT is cancelled and fails.
    """
    env = {**slurm.env, **variables, "VENV": str(Path(sys.executable).parent.parent),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = ["sbatch", "--parsable", "--wait", f"--output={tmp}/job-%j-%a.out", *options, f"slurm/{script}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        diag = slurm.diagnostics()
        subprocess.run(["scancel", "--full", out.strip().split(";")[0]], env=slurm.env, capture_output=True,
                       timeout=10)
        pytest.fail(f"sbatch {script} did not finish in {JOB_TIMEOUT} s:\n{_outputs(tmp)}\n{diag}")
    job_id = out.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch printed {out!r}, stderr {err!r}"
    return proc.returncode, job_id, _outputs(tmp)


def _outputs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(tmp.glob("job-*.out")))


def test_run_srun_pmi2_four_ranks_on_two_cores(cluster: LocalSlurm, tiny: dict[str, Path], reference: list[int],
                                               tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    code, job_id, log = sbatch(cluster, "run.sbatch", tmp_path, {
        "LAUNCHER": "srun", "SRUN_MPI": "pmi2", "MODEL": str(tiny["model"]), "SHARDS": str(tiny["shards4"]),
        "RESULTS": str(results), "OUTDIR": str(tmp_path / "out"),
        "OVERRIDES": f"prompt_ids=[{','.join(map(str, IDS))}] generation.max_new_tokens={NEW} "
                     "generation.stop_on_eos=false logging.quiet=true",
    }, ["--ntasks=4", "--overcommit"])  # more ranks than the node's cores, as emulated devices are
    assert code == 0, log
    [rec] = read_jsonl(results)
    assert rec["world_size"] == 4 and [r["rank"] for r in rec["ranks"]] == [0, 1, 2, 3]
    assert rec["token_ids"] == reference
    assert rec["slurm"]["job_id"] == job_id and rec["slurm"]["ntasks"] == "4"
    assert rec["shards"] == str(tiny["shards4"])
    assert rec["hydra_output_dir"] == str(tmp_path / "out" / job_id)
    assert "srun --mpi=pmi2" in log


def test_run_mpirun_inside_allocation_with_staged_shards(cluster: LocalSlurm, tiny: dict[str, Path],
                                                         reference: list[int], tmp_path: Path) -> None:
    results, stage = tmp_path / "results.jsonl", tmp_path / "local-disk"
    code, job_id, log = sbatch(cluster, "run.sbatch", tmp_path, {
        "LAUNCHER": "mpirun", "MODEL": str(tiny["model"]), "SHARDS": str(tiny["shards2"]),
        "STAGE_DIR": str(stage), "RESULTS": str(results), "OUTDIR": str(tmp_path / "out"),
        "OVERRIDES": f"prompt_ids=[{','.join(map(str, IDS))}] generation.max_new_tokens={NEW} "
                     "generation.stop_on_eos=false",
    }, ["--ntasks=2"])
    assert code == 0, log
    [rec] = read_jsonl(results)
    assert rec["world_size"] == 2 and rec["token_ids"] == reference
    assert rec["shards"] == str(stage) and rec["slurm"]["job_id"] == job_id
    for r in (0, 1):  # each rank read its own copy, identical to the shared split
        staged, shared = stage / f"rank_{r}", tiny["shards2"] / f"rank_{r}"
        assert sorted(p.name for p in staged.iterdir()) == sorted(p.name for p in shared.iterdir())
        assert (staged / "manifest.json").read_bytes() == (shared / "manifest.json").read_bytes()
    assert not list(stage.glob(".rank_*")), "a temporary copy was left behind"
    assert "mpirun -n 2" in log


def test_sweep_job_array_collects_one_record_per_line(cluster: LocalSlurm, tiny: dict[str, Path],
                                                      reference: list[int], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# two runs\ncomm.algo=star generation.max_new_tokens=3\n\n"
                     f'comm.algo=ring generation.max_new_tokens={NEW} prompt="not used: ids win"\n')
    results = tmp_path / "results.jsonl"
    code, job_id, log = sbatch(cluster, "sweep.sbatch", tmp_path, {
        "SWEEP": str(sweep), "MODEL": str(tiny["model"]), "SHARDS": str(tiny["shards2"]),
        "RESULTS": str(results), "OUTDIR": str(tmp_path / "out"),
        "OVERRIDES": f"prompt_ids=[{','.join(map(str, IDS))}] generation.stop_on_eos=false",
    }, ["--ntasks=2", "--array=1-2"])
    assert code == 0, log
    recs = {r["slurm"]["array_task_id"]: r for r in read_jsonl(results)}
    assert sorted(recs) == ["1", "2"], log
    assert recs["1"]["comm_algo"] == "star" and recs["1"]["token_ids"] == reference[:3]
    assert recs["2"]["comm_algo"] == "ring" and recs["2"]["token_ids"] == reference
    assert recs["2"]["config"]["prompt"] == "not used: ids win"  # a quoted override stayed one word
    for task, rec in recs.items():
        assert rec["slurm"]["array_job_id"] == job_id
        assert rec["hydra_output_dir"] == str(tmp_path / "out" / f"{job_id}_{task}")


@pytest.mark.parametrize("variables, options, message", [
    ({"SHARDS": "{root}/missing"}, ["--ntasks=2"], "does not exist"),
    ({"LAUNCHER": "ssh"}, ["--ntasks=2"], "LAUNCHER=ssh: choose srun or mpirun"),
    ({"REPO": "{root}/elsewhere"}, ["--ntasks=2"], "slurm/tpi_launch.sh: submit from the repository root"),
    ({"SHARDS": "{shards2}", "STAGE_DIR": "{shards2}"}, ["--ntasks=2"], "STAGE_DIR must differ from SHARDS"),
])
def test_bad_input_fails_the_job_with_one_line(cluster: LocalSlurm, tiny: dict[str, Path], tmp_path: Path,
                                               variables: dict[str, str], options: list[str], message: str) -> None:
    values = {k: v.format(root=tiny["root"], shards2=tiny["shards2"], shards4=tiny["shards4"])
              for k, v in variables.items()}
    code, _, log = sbatch(cluster, "run.sbatch", tmp_path, {
        "MODEL": str(tiny["model"]), "RESULTS": str(tmp_path / "results.jsonl"), "OUTDIR": str(tmp_path / "out"),
        "OVERRIDES": "prompt_ids=[1,2,3] generation.max_new_tokens=2", **values}, options)
    assert code != 0, log
    errors = [line for line in log.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1 and message in errors[0], log
    assert "Traceback" not in log
    assert not (tmp_path / "results.jsonl").exists()


def test_sweep_line_missing_is_an_error(cluster: LocalSlurm, tiny: dict[str, Path], tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("generation.max_new_tokens=2\n")
    code, _, log = sbatch(cluster, "sweep.sbatch", tmp_path, {
        "SWEEP": str(sweep), "MODEL": str(tiny["model"]), "SHARDS": str(tiny["shards2"]),
        "RESULTS": str(tmp_path / "results.jsonl"), "OUTDIR": str(tmp_path / "out")}, ["--ntasks=2", "--array=2"])
    assert code != 0
    assert "array task 2 has no line in" in log and "(1 lines)" in log, log


def test_serve_sbatch_listens_on_the_first_node_and_scancel_stops_it(cluster: LocalSlurm, tmp_path: Path) -> None:
    """slurm/serve.sbatch: the job's output says where the server listens; a client is answered; scancel ends
    the job cleanly (rank 0 stops the workers, no error line)."""
    import re
    import time

    import openai

    model = make_model(tmp_path / "tiny", "tiny", "llama", layers=2, seed=5)
    env = {**cluster.env, "MODEL": str(model), "SHARDS": str(split(model, tmp_path / "shards2", 2)),
           "OUTDIR": str(tmp_path / "out"), "SERVE_PORT": "0", "OVERRIDES": "threads=1",
           "VENV": str(Path(sys.executable).parent.parent),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", "--ntasks=2",
                          "slurm/serve.sbatch"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    job_id = out.stdout.strip().split(";")[0]
    assert out.returncode == 0 and job_id.isdigit(), out
    log = tmp_path / f"job-{job_id}.out"
    try:
        deadline, url = time.monotonic() + JOB_TIMEOUT, None
        while url is None and time.monotonic() < deadline:
            m = re.search(r"serving tiny on (http://127\.0\.0\.1:\d+/v1) ", log.read_text() if log.exists() else "")
            url = m.group(1) if m else None
            if url is None:
                time.sleep(0.2)
        assert url, f"no 'serving' line:\n{_outputs(tmp_path)}\n{cluster.diagnostics()}"
        text = log.read_text()
        assert f"the server starts on {NODE}" in text and "srun --mpi=pmi2" in text
        c = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        r = c.completions.create(model="tiny", prompt=IDS, max_tokens=NEW)
        assert r.usage is not None and r.usage.prompt_tokens == len(IDS) and r.choices[0].finish_reason
    finally:
        subprocess.run(["scancel", job_id], env=cluster.env, capture_output=True, timeout=30)
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-j", job_id], env=cluster.env, capture_output=True, text=True,
                               timeout=30)
        if job_id not in queue.stdout:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the server job did not end after scancel:\n{_outputs(tmp_path)}")
    text = log.read_text()
    assert "tpi_mpi: server stopped" in text and "tpi_mpi: error" not in text, text
