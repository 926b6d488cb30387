"""The sweep driver and the figures: commands as documented, sweeps that need what is missing are skipped
with the reason, and a small sweep end to end gives records (the same tokens from every implementation),
PNG and PDF figures and the summary tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments import run_all
from tpi_mpi.results import read_jsonl

LINK = {"alpha": 50e-6, "beta": 1e-9, "gamma": 0.0}
CALIBRATION = {
    "cores": 2, "compute_all_cores": {"flops": 20e9, "weight_bw": 5e9, "layer_overhead_s": 2e-4},
    "compute_1_thread": {"flops": 10e9, "weight_bw": 4e9, "layer_overhead_s": 2e-4},
    "disk_bw": 1e9, "base_rss": 350e6, "base_rss_master": 380e6,
    "links": {"2": {k: LINK for k in ("star", "ring", "mesh", "tree", "mpi", "bcast", "p2p")}},
}


def test_dry_run_prints_one_mpirun_per_model_and_world_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_all.main(["--dry-run", "--repeats", "2", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    cmds = out.splitlines()
    sweeps = run_all.load_sweeps(None)
    expected = sum(len(s["models"]) * sum(len(r["ranks"]) for r in s["runs"])
                   for s in sweeps.values() if run_all.missing_requirement(s) is None)
    assert len(cmds) == expected > 0
    assert all(" -m tpi_mpi.run -m " in c and "generation.seed=1,2" in c for c in cmds)
    assert any("-n 8 " in c and "comm=star,ring,mesh,tree,mpi" in c for c in cmds)
    assert all(" -bind-to core -n " in c for c in cmds)  # every rank pinned to a core by default
    for name, s in sweeps.items():
        why = run_all.missing_requirement(s)
        assert (f"[{name}] skipped: {why}" in err) == (why is not None)


def test_sweep_repeats_and_binding_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_all.main(["--dry-run", "--sweeps", "devices,window", "--bind-to", "none", "--out", str(tmp_path)]) == 0
    cmds = capsys.readouterr().out.splitlines()
    assert cmds and not any("-bind-to" in c for c in cmds)
    devices = run_all.load_sweeps(["devices"])["devices"]["repeats"]
    seeds = {c.split("generation.seed=")[1].split()[0] for c in cmds}
    assert ",".join(map(str, range(1, devices + 1))) in seeds and "1,2,3" in seeds  # the file's repeats: 9 and 3


def test_requirements_are_checked() -> None:
    assert run_all.missing_requirement({"requires": ["conf/comm"]}) is None
    assert "does not exist" in str(run_all.missing_requirement({"requires": ["conf/nothing-here"]}))
    assert run_all.missing_requirement({"requires": ["comm.algo"]}) is None
    assert "no key memory.nonsense" in str(run_all.missing_requirement({"requires": ["memory.nonsense"]}))


def test_small_sweep_end_to_end(tmp_path: Path) -> None:
    sweeps = tmp_path / "sweeps"
    sweeps.mkdir()
    (sweeps / "baselines.yaml").write_text(yaml.safe_dump({"title": "t", "models": ["tiny"], "runs": [
        {"ranks": [2], "overrides": ["comm=star"], "sweep": {"baseline": "null,pipeline"}},
        {"ranks": [1], "overrides": ["baseline=accelerate"], "budget_ranks": 2, "sweep": {}}]}))
    out, figs = tmp_path / "out", tmp_path / "figs"
    out.mkdir()
    (out / "calibration.json").write_text(json.dumps(CALIBRATION))
    code = run_all.main(["--sweeps-dir", str(sweeps), "--out", str(out), "--figures", str(figs), "--repeats", "1",
                         "--new-tokens", "4", "--prompt-tokens", "6", "--no-calibrate", "--timeout", "240"])
    assert code == 0
    recs = read_jsonl(out / "baselines" / "records.jsonl")
    assert sorted(str(r["baseline"]) for r in recs) == ["None", "accelerate", "pipeline"]
    assert len({tuple(r["token_ids"]) for r in recs}) == 1  # same prompt, same greedy tokens, every impl
    acc = next(r for r in recs if r["baseline"] == "accelerate")
    weights = sum(f.stat().st_size for f in (out / "models" / "tiny").glob("*.safetensors"))
    assert str(acc["config"]["accelerate"]["max_memory"]) == str(weights // 2)
    assert all(r["config"]["logging"]["wandb_group"] == "baselines" for r in recs)
    for name in ("fig_baselines", "fig_perfmodel"):
        assert (figs / f"{name}.png").stat().st_size > 1000 and (figs / f"{name}.pdf").stat().st_size > 1000
    summary = (figs / "summary.md").read_text()
    assert "| tiny | pipeline | 2 |" in summary and "| tiny | accelerate | 1 |" in summary
    assert "Llama 2-70B" in summary and "Within 25 %" in summary
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sweeps"]["baselines"]["mpiruns"] == 2 and meta["loadavg_before"]
