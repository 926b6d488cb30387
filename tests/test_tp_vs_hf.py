"""The tensor-parallel model reproduces Hugging Face transformers on one process: prompt logits within
1e-4 (fp32) and 32 greedy tokens identical, across architectures, world sizes and uneven splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, mpirun
from transformers import AutoModelForCausalLM

from tpi_mpi.make_model import make_model
from tpi_mpi.weights.split import split

PROMPT = [1, 37, 250, 11, 400, 99, 3, 77, 120, 301, 45, 8]
NEW_TOKENS = 32

MODELS = {
    # name: (arch, config overrides)
    "llama-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "llama-odd-heads": ("llama", {"hidden_size": 160, "num_attention_heads": 5, "num_key_value_heads": 5}),
    "llama-bias": ("llama", {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3,
                             "attention_bias": True, "mlp_bias": True}),
    "llama3-rope-scaling": ("llama", {"num_attention_heads": 8, "num_key_value_heads": 4,
                                      "max_position_embeddings": 131072, "rope_theta": 500000.0,
                                      "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}}),
    "qwen2-tied": ("qwen2", {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3}),
    "mistral-window": ("mistral", {"sliding_window": 6}),
}

CASES = [
    ("llama-gqa", 1, None),
    ("llama-gqa", 2, None),
    ("llama-gqa", 2, [0.7, 0.3]),
    ("llama-odd-heads", 2, None),
    ("llama-odd-heads", 3, None),
    ("llama-odd-heads", 4, [0.4, 0.2, 0.2, 0.2]),
    ("llama-bias", 3, None),
    ("llama3-rope-scaling", 4, None),
    ("qwen2-tied", 3, None),
    ("qwen2-tied", 2, [0.6, 0.4]),
    ("mistral-window", 2, None),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_model(root / name, "tiny", arch, layers=3, seed=i, overrides=over,
                             file_per_layer=i % 2 == 1)
            for i, (name, (arch, over)) in enumerate(MODELS.items())}


def hf_reference(model_dir: Path) -> tuple[np.ndarray, list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        tokens: list[int] = []
        for _ in range(NEW_TOKENS):  # full recompute each step: HF's plain forward is the reference
            nxt = int(model(ids).logits[0, -1].argmax())
            tokens.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return logits, tokens


@pytest.mark.parametrize("name,n,ratios", CASES, ids=[f"{c[0]}-n{c[1]}{'-uneven' if c[2] else ''}" for c in CASES])
def test_matches_hf(models: dict[str, Path], tmp_path: Path, name: str, n: int, ratios: list[float] | None) -> None:
    shards = split(models[name], tmp_path / "shards", n, ratios)
    out = tmp_path / "tp.npz"
    proc = mpirun(n, [str(SCRIPTS / "tp_forward.py"), str(shards), str(out), str(NEW_TOKENS),
                      *map(str, PROMPT)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    ref_logits, ref_tokens = hf_reference(models[name])
    assert got["logits"].shape == ref_logits.shape
    assert np.abs(got["logits"] - ref_logits).max() < 1e-4
    assert got["tokens"].tolist() == ref_tokens



@pytest.mark.parametrize("name,n,ratios", [("llama-gqa", 2, [0.7, 0.3]), ("qwen2-tied", 3, None)],
                         ids=["llama-gqa-n2-uneven", "qwen2-tied-n3"])
def test_head_on_master_matches_hf(models: dict[str, Path], tmp_path: Path, name: str, n: int,
                                   ratios: list[float] | None) -> None:
    """memory.head=master (rank 0 computes all the logits) equals HF as the default vocabulary split does."""
    shards = split(models[name], tmp_path / "shards", n, ratios)
    out = tmp_path / "tp.npz"
    proc = mpirun(n, [str(SCRIPTS / "tp_forward.py"), "--head=master", str(shards), str(out), str(NEW_TOKENS),
                      *map(str, PROMPT)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    ref_logits, ref_tokens = hf_reference(models[name])
    assert np.abs(got["logits"] - ref_logits).max() < 1e-4
    assert got["tokens"].tolist() == ref_tokens


ALGOS = ["star", "ring", "mesh", "tree", "mpi", "auto"]


@pytest.fixture(scope="module")
def tokens_by_algo(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Greedy tokens of each allreduce on 3 ranks (odd: uneven ring chunks, tree's extra rank), from one
    mpirun that repeats the generation with each in turn, and HF's under "hf"."""
    tmp = tmp_path_factory.mktemp("algos")
    shards = split(models["llama-odd-heads"], tmp / "shards", 3)
    proc = mpirun(3, [str(SCRIPTS / "tp_forward.py"), f"--algos={','.join(ALGOS)}", str(shards), str(tmp / "tp.npz"),
                      str(NEW_TOKENS), *map(str, PROMPT)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp / "tp.npz")
    return {"hf": hf_reference(models["llama-odd-heads"])[1],
            **{algo: got[f"tokens_{algo}"].tolist() for algo in ALGOS}}


@pytest.mark.parametrize("algo", ALGOS, ids=[f"algo-{a}-n3" for a in ALGOS])
def test_every_allreduce_generates_hf_tokens(tokens_by_algo: dict[str, list[int]], algo: str) -> None:
    assert tokens_by_algo[algo] == tokens_by_algo["hf"]
