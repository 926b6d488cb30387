"""The committed trained model (checkpoints/shakespeare): the tensor-parallel engine reproduces transformers on it
(prompt logits within 1e-4 and 32 greedy tokens, N = 1..4), and tpi_mpi.eval's held-out perplexity equals
transformers' within 1e-4 relative (fp32; the same windows, perplexity.py) for N = 1 and 3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SCRIPTS, mpirun
from transformers import AutoModelForCausalLM, AutoTokenizer

from tpi_mpi.perplexity import hf_perplexity
from tpi_mpi.split import split
from tpi_mpi.training import corpus as corpus_mod

MODEL = ROOT / "checkpoints" / "shakespeare"
CORPUS_DIR = Path(os.environ.get(corpus_mod.DIR_ENV) or ROOT / corpus_mod.DEFAULT_DIR)
PROMPT = "KING.\nWhat say you, my lord?"
NEW_TOKENS = 32
EVAL_TOKENS = 1500  # 6 windows of 256, the last one short


@pytest.fixture(scope="module")
def hf() -> tuple[object, object]:
    return (AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(MODEL))


def test_checkpoint_is_the_documented_model(hf: tuple[object, object]) -> None:
    model, tok = hf
    cfg = model.config  # type: ignore[attr-defined]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (16, 8)  # GQA; 8 KV heads: up to 8 ranks
    assert cfg.hidden_act == "silu" and cfg.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 7.5e6  # type: ignore[attr-defined]
    assert (MODEL / "model.safetensors").stat().st_size <= 30e6
    assert tok.chat_template and len(tok) == cfg.vocab_size  # type: ignore[attr-defined]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_tp_matches_hf_on_trained_model(hf: tuple[object, object], tmp_path: Path, n: int) -> None:
    model, tok = hf
    ids = tok(PROMPT).input_ids  # type: ignore[operator]
    shards = split(MODEL, tmp_path / "shards", n)
    out = tmp_path / "tp.npz"
    proc = mpirun(n, [str(SCRIPTS / "tp_forward.py"), str(shards), str(out), str(NEW_TOKENS), *map(str, ids)],
                  timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    with torch.no_grad():
        t = torch.tensor([ids])
        ref_logits = model(t).logits[0].numpy()  # type: ignore[operator]
        ref: list[int] = []
        for _ in range(NEW_TOKENS):  # full recompute each step: HF's plain forward is the reference
            ref.append(int(model(t).logits[0, -1].argmax()))  # type: ignore[operator]
            t = torch.cat([t, torch.tensor([[ref[-1]]])], dim=1)
    assert np.abs(got["logits"] - ref_logits).max() < 1e-4
    assert got["tokens"].tolist() == ref
    assert len(set(ref)) > 4  # a trained model says something, not one token over and over


@pytest.fixture(scope="module")
def hf_heldout(hf: tuple[object, object]) -> float:
    model, tok = hf
    text = corpus_mod.fetch(CORPUS_DIR).heldout.read_text()
    ids = tok(text, add_special_tokens=False).input_ids[:EVAL_TOKENS]  # type: ignore[operator]
    return hf_perplexity(model, ids, model.config.max_position_embeddings, tok.bos_token_id).perplexity  # type: ignore


@pytest.mark.parametrize("n", [1, 3])
def test_eval_perplexity_matches_hf(hf_heldout: float, tmp_path: Path, n: int) -> None:
    record = tmp_path / "eval.json"
    proc = mpirun(n, ["-m", "tpi_mpi.eval", f"hydra.run.dir={tmp_path}/hydra", f"model.path={MODEL}",
                      f"model.cache_dir={tmp_path}/shards", f"eval.corpus_dir={CORPUS_DIR}",
                      f"eval.max_tokens={EVAL_TOKENS}", f"output.json={record}", "output.results=null"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(record.read_text())
    assert rec["kind"] == "eval" and rec["world_size"] == n and len(rec["ranks"]) == n
    assert rec["tokens"] == EVAL_TOKENS and rec["windows"] == 6 and rec["window"] == 256
    assert abs(rec["perplexity"] / hf_heldout - 1) < 1e-4, (rec["perplexity"], hf_heldout)
    assert f"perplexity {rec['perplexity']:.4f} over {EVAL_TOKENS} tokens" in proc.stdout


def test_eval_bad_text_is_one_error_line(tmp_path: Path) -> None:
    proc = mpirun(2, ["-m", "tpi_mpi.eval", f"hydra.run.dir={tmp_path}/hydra", f"model.path={MODEL}",
                      f"model.cache_dir={tmp_path}/shards", f"eval.text={tmp_path}/missing.txt",
                      "output.results=null"], timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert errors == [f"tpi_mpi: error: eval.text={tmp_path}/missing.txt is not a file: give a UTF-8 text file, "
                      "or null for the Shakespeare held-out split"], proc.stderr[-2000:]
