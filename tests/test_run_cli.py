"""End to end through `mpirun -n N python -m tpi_mpi.run`: the record, the outputs, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import mpirun, run_tpi
from transformers import AutoModelForCausalLM

from tpi_mpi.config import build_config
from tpi_mpi.make_model import make_model
from tpi_mpi.results import read_jsonl
from tpi_mpi.weights.split import split

IDS = [1, 40, 41, 300, 7, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=3)
    return {"root": root, "model": model, "shards2": split(model, root / "shards2", 2),
            "other2": split(model, root / "other2", 2)}


def base(t: dict[str, Path], tmp: Path) -> list[str]:
    return [f"model.path={t['model']}", f"model.shards={t['shards2']}", f"output.json={tmp}/r.json",
            f"output.results={tmp}/results.jsonl"]


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], 1)
    return out


def test_run_writes_record_and_matches_hf(tiny: dict[str, Path], tmp_path: Path) -> None:
    proc = run_tpi(2, [*base(tiny, tmp_path), f"prompt_ids={IDS}", "generation.max_new_tokens=12",
                       "generation.stop_on_eos=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["prompt_tokens"] == len(IDS) and rec["generated_tokens"] == 12
    assert rec["token_ids"] == hf_greedy(tiny["model"], IDS, 12)
    assert rec["ttft_s"] > 0 and 0 < rec["token_latency_s"]["p50"] <= rec["token_latency_s"]["p90"]
    assert rec["tokens_per_s"] > 0 and rec["config"]["comm"]["algo"] == "star"
    assert [r["rank"] for r in rec["ranks"]] == [0, 1]
    for r in rec["ranks"]:
        assert r["peak_rss_bytes"] > 0 and r["bytes_sent"] > 0 and r["bytes_received"] > 0
        assert r["compute_s"] > 0 and r["comm_s"] > 0
    # 2 allreduces per layer per forward pass (prefill + 11 decode steps), on every rank
    assert rec["ranks"][1]["allreduce"]["calls"] == 2 * 2 * 12
    assert read_jsonl(tmp_path / "results.jsonl")[0]["token_ids"] == rec["token_ids"]
    # Only rank 0 ran Hydra: one output folder with one config and one log.
    assert (tmp_path / "hydra" / ".hydra" / "config.yaml").is_file()
    assert len(list((tmp_path / "hydra").glob("*.log"))) == 1


def test_text_prompt_streams_and_mpi_allreduce_agrees(tiny: dict[str, Path], tmp_path: Path) -> None:
    star = run_tpi(2, [*base(tiny, tmp_path), "prompt=Once upon a time", "generation.max_new_tokens=8"], tmp_path)
    assert star.returncode == 0, star.stderr[-3000:]
    assert star.stdout.startswith("Once upon a time")
    r1 = json.loads((tmp_path / "r.json").read_text())
    mpi = run_tpi(2, [*base(tiny, tmp_path), "prompt=Once upon a time", "generation.max_new_tokens=8",
                      "comm=mpi"], tmp_path)
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    r2 = json.loads((tmp_path / "r.json").read_text())
    assert r2["config"]["comm"]["algo"] == "mpi" and r2["token_ids"] == r1["token_ids"]
    assert r1["text"] and star.stdout.rstrip("\n").endswith(r1["text"])
    assert len(read_jsonl(tmp_path / "results.jsonl")) == 2


def test_auto_picks_the_int8_wire_when_allowed(tiny: dict[str, Path], tmp_path: Path) -> None:
    """comm=auto with comm.dtype=auto (lossy wires allowed) on a bandwidth-bound link (the software-modelled
    4G profile, 20 Mbit/s) sends int8 blocks, ~0.28 x fp32's bytes, and every rank records the same choice.
    (With a fixed comm.dtype auto keeps that wire whatever the link: allreduce_check.py.)"""
    proc = run_tpi(2, [*base(tiny, tmp_path), f"prompt_ids={IDS}", "generation.max_new_tokens=3",
                       "generation.stop_on_eos=false", "comm=auto", "comm.dtype=auto",
                       "emulation.links=software", "network=4g"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "r.json").read_text())
    choices = [r["allreduce_auto"] for r in rec["ranks"]]
    assert all(c == choices[0] for c in choices), choices
    decode, prefill = 4 * 256, 4 * 256 * len(IDS)  # float32 bytes of 1 and of 6 tokens' hidden states (256)
    assert {choices[0][str(decode)]["wire"], choices[0][str(prefill)]["wire"]} == {"int8"}, choices[0]
    ar = rec["ranks"][1]["allreduce"]
    int8_bytes = 2 * 2 * (256 * 1.125 * 2 + 256 * len(IDS) * 1.125)  # 2 layers x 2 allreduces x 3 passes
    assert ar["calls"] == 2 * 2 * 3 and ar["bytes_sent"] == int8_bytes, ar  # N=2: rank 1 sends its partial once


def test_sampling_is_seeded(tiny: dict[str, Path], tmp_path: Path) -> None:
    runs = []
    for seed in (1, 1, 2):
        proc = run_tpi(2, [*base(tiny, tmp_path), f"prompt_ids={IDS}", "generation=sample",
                           "generation.max_new_tokens=16", "generation.temperature=2.0",
                           "generation.top_k=0", "generation.stop_on_eos=false", f"generation.seed={seed}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads((tmp_path / "r.json").read_text())["token_ids"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_auto_split_with_ratios(tiny: dict[str, Path], tmp_path: Path) -> None:
    proc = run_tpi(2, [f"model.path={tiny['model']}", f"model.cache_dir={tmp_path}/cache",
                       "model.ratios=[0.6,0.4]", f"prompt_ids={IDS}", "generation.max_new_tokens=6",
                       "generation.stop_on_eos=false", f"output.json={tmp_path}/r.json", "output.results=null"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "r.json").read_text())["token_ids"] == hf_greedy(tiny["model"], IDS, 6)
    (split_dir,) = (tmp_path / "cache").iterdir()
    manifest = json.loads((split_dir / "rank_1" / "manifest.json").read_text())
    assert manifest["plan"]["ratios"] == [0.6, 0.4]


def test_workers_never_get_the_prompt() -> None:
    cfg = build_config({"model": {"path": "m"}, "comm": {}, "memory": {}, "generation": {}, "logging": {},
                        "output": {}, "prompt": "my secret", "prompt_ids": [5, 6]})
    public = cfg.public()
    assert public.prompt is None and public.prompt_ids is None
    assert "secret" not in json.dumps(public.to_json())


def _foreign(t: dict[str, Path], tmp: Path) -> str:
    mixed = tmp / "mixed"
    shutil.copytree(t["shards2"], mixed)
    shutil.rmtree(mixed / "rank_1")
    shutil.copytree(t["other2"] / "rank_1", mixed / "rank_1")
    return f"model.shards={mixed}"


def _gpt2(t: dict[str, Path], tmp: Path) -> str:
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return f"model.path={tmp}/gpt2"


# (case, ranks, overrides or a function making one, what the error line must say)
BAD_INPUT = [
    ("missing shard dir", 2, ["model.shards=/nonexistent/shards"], "does not exist"),
    ("world size differs", 3, [], "were split for 2 ranks but 3 were started"),
    ("foreign shard dir", 2, [_foreign], "comes from another split"),
    ("ratios do not sum to 1", 2, ["model.shards=null", "model.ratios=[0.7,0.7]"], "must sum to 1"),
    ("ratio leaves a rank no head", 2, ["model.shards=null", "model.ratios=[0.95,0.05]"], "without a KV head"),
    ("unsupported architecture", 2, ["model.shards=null", _gpt2], "unsupported architecture 'gpt2'"),
    ("prompt longer than positions", 2, [f"prompt_ids={[5] * 600}"], "the prompt has 600 tokens"),
    ("token id outside vocabulary", 2, ["prompt_ids=[99999]"], "outside the vocabulary"),
    ("unknown allreduce", 2, ["comm.algo=foo"], "unknown comm.algo='foo'"),
    ("negative max_new_tokens", 2, ["generation.max_new_tokens=-1"], "max_new_tokens must be >= 0"),
    ("unknown config key", 2, ["+model.colour=red"], "unknown key model.colour"),
]


@pytest.mark.parametrize("case,n,overrides,message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_line(tiny: dict[str, Path], tmp_path: Path, case: str, n: int,
                                     overrides: list, message: str) -> None:
    args = [o(tiny, tmp_path) if callable(o) else o for o in overrides]
    args = [*base(tiny, tmp_path), f"model.cache_dir={tmp_path}/cache", f"prompt_ids={IDS}", *args]
    proc = run_tpi(n, args, tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "r.json").exists()


def test_multirun_and_wandb_offline(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A Hydra multirun sends each job to the workers; wandb offline writes a local run, no network."""
    proc = mpirun(2, ["-m", "tpi_mpi.run", "-m", f"hydra.sweep.dir={tmp_path}/sweep",
                      f"model.path={tiny['model']}", f"model.shards={tiny['shards2']}", f"prompt_ids={IDS}",
                      "generation.stop_on_eos=false", "generation.max_new_tokens=2,5", "logging.wandb=true",
                      f"output.results={tmp_path}/results.jsonl"],
                  env={"WANDB_DIR": str(tmp_path), "WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["generated_tokens"] for r in read_jsonl(tmp_path / "results.jsonl")] == [2, 5]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
