"""Baselines in the same harness: pipeline parallelism and the two HF baselines generate exactly HF's
greedy tokens and write the same run record; bad combinations stop with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_tpi
from test_run_cli import hf_greedy

from tpi_mpi.baselines.pipeline import layer_ranges
from tpi_mpi.make_model import make_model

IDS = [1, 40, 41, 300, 7, 9]
NEW = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("baselines")
    m = make_model(root / "m", "tiny", "llama", layers=5, seed=7,
                   overrides={"num_attention_heads": 4, "num_key_value_heads": 2})
    return {"root": root, "model": m, "hf": hf_greedy(m, IDS, NEW)}


def run(n: int, model: dict[str, object], tmp: Path, *extra: str) -> tuple[int, dict | None, str]:
    proc = run_tpi(n, [f"model.path={model['model']}", f"model.cache_dir={model['root']}/shards",
                       f"prompt_ids={IDS}", f"generation.max_new_tokens={NEW}", "generation.stop_on_eos=false",
                       f"output.json={tmp}/r.json", "output.results=null", "logging.quiet=true", *extra], tmp)
    rec = json.loads((tmp / "r.json").read_text()) if (tmp / "r.json").is_file() else None
    return proc.returncode, rec, proc.stderr


def test_layer_ranges_contiguous_and_balanced() -> None:
    for layers in range(1, 12):
        for n in range(1, layers + 1):
            r = layer_ranges(layers, n)
            assert r[0][0] == 0 and r[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(r, r[1:], strict=False))
            sizes = [e - s for s, e in r]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)  # extras on the last ranks


@pytest.mark.parametrize("n", [1, 2, 3])
def test_pipeline_tokens_equal_hf(model: dict[str, object], tmp_path: Path, n: int) -> None:
    code, rec, err = run(n, model, tmp_path, "baseline=pipeline")
    assert code == 0, err[-3000:]
    assert rec is not None and rec["token_ids"] == model["hf"]
    assert rec["baseline"] == "pipeline" and rec["world_size"] == n
    assert rec["layer_ranges"] == [list(r) for r in layer_ranges(5, n)]
    assert [r["layers"] for r in rec["ranks"]] == rec["layer_ranges"]
    # each forward pass goes once around the ring: every rank sends and receives when N > 1
    for r in rec["ranks"]:
        assert r["compute_s"] > 0 and r["peak_rss_bytes"] > 0
        assert (r["bytes_sent"] > 0 and r["bytes_received"] > 0) == (n > 1)


def test_transformers_baseline_equals_hf(model: dict[str, object], tmp_path: Path) -> None:
    code, rec, err = run(1, model, tmp_path, "baseline=transformers")
    assert code == 0, err[-3000:]
    assert rec is not None and rec["token_ids"] == model["hf"] and rec["baseline"] == "transformers"
    assert rec["ttft_s"] > 0 and rec["token_latency_s"]["p50"] > 0 and rec["ranks"][0]["peak_rss_bytes"] > 0


def test_accelerate_offloads_under_budget_and_equals_hf(model: dict[str, object], tmp_path: Path) -> None:
    offload = tmp_path / "offload"
    code, rec, err = run(1, model, tmp_path, "baseline=accelerate", "accelerate.max_memory=1MB",
                         f"accelerate.offload_folder={offload}")
    assert code == 0, err[-3000:]
    assert rec is not None and rec["token_ids"] == model["hf"]
    # the 1 MB budget holds no layer: Accelerate put the modules on disk ("" = the whole model)
    assert rec["offloaded_modules"] and "disk" in rec["ranks"][0]["device_map"].values()
    assert list(offload.iterdir()) == []  # its offload copy is removed after the run


@pytest.mark.parametrize("extra,n,message", [
    (["baseline=transformers"], 2, "runs on one process: start it with mpirun -n 1"),
    (["baseline=pipeline"], 6, "needs at least one layer per rank"),
    (["baseline=bogus"], 1, "unknown baseline='bogus'"),
    (["baseline=accelerate", "accelerate.max_memory=lots"], 1, "is not a size"),
    (["baseline=pipeline", "model.ratios=[0.5,0.5]"], 2, "set model.ratios=null"),
])
def test_bad_input_one_line(model: dict[str, object], tmp_path: Path, extra: list[str], n: int,
                            message: str) -> None:
    code, rec, err = run(n, model, tmp_path, *extra)
    assert code != 0 and rec is None
    lines = [ln for ln in err.splitlines() if ln.startswith("tpi_mpi: error:")]
    assert len(lines) == 1 and message in lines[0], err[-2000:]
    assert "Traceback" not in err
