"""models/decoder_config.py: the config a split resolves for its ranks, and RoPE without transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, mpirun
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tpi_mpi.make_model import make_model
from tpi_mpi.models.decoder_config import DecoderConfig, Rope, apply_rope, hf_config, resolve
from tpi_mpi.weights.split import split

BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 32, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "rope_theta": 500000.0}
ROPES = {
    "default": {},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 512}},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
    "qwen2-window": {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_from_the_resolved_config_has_hf_bits(name: str) -> None:
    """cos, sin and the rotated q, k equal HF's LlamaRotaryEmbedding and apply_rotary_pos_emb bit for bit, in fp32
    and fp16, at positions a prompt and a decoding step use; the resolved values equal HF's config's; the entry
    survives the manifest's JSON."""
    config = {**BASE, **ROPES[name]}
    resolved = json.loads(json.dumps(resolve(config)))
    assert resolved["rope"] is not None
    cfg, hf = DecoderConfig.of(config, resolved), hf_config(config)
    assert (cfg.hidden_size, cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.eos_token_id) == \
        (hf.hidden_size, hf.rms_norm_eps, hf.max_position_embeddings, hf.eos_token_id)
    ours, theirs = Rope(cfg), LlamaRotaryEmbedding(hf)
    assert ours.hf is None  # computed here, not by HF's module
    for dtype in (torch.float32, torch.float16):
        for positions in (torch.arange(0, 37)[None], torch.tensor([[3000]])):
            x = torch.zeros(1, dtype=dtype)
            (c, s), (hc, hs) = ours(x, positions), theirs(x, positions)
            assert c.dtype == dtype and torch.equal(c, hc) and torch.equal(s, hs)
            q = torch.randn(1, 4, positions.shape[1], 16).to(dtype)
            k = torch.randn(1, 2, positions.shape[1], 16).to(dtype)
            for a, b in zip(apply_rope(q, k, c, s), apply_rotary_pos_emb(q, k, hc, hs), strict=True):
                assert torch.equal(a, b)
    if name == "qwen2-window":
        assert cfg.windows == (None, 16) or cfg.windows == (16, None)
        assert list(cfg.windows) == [16 if t == "sliding_attention" else None for t in hf.layer_types]


def test_length_dependent_rope_is_left_to_hf() -> None:
    config = {**BASE, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    resolved = resolve(config)
    assert resolved["rope"] is None
    rope = Rope(DecoderConfig.of(config, resolved))
    assert isinstance(rope.hf, LlamaRotaryEmbedding)
    hf = LlamaRotaryEmbedding(hf_config(config))
    x, positions = torch.zeros(1), torch.arange(0, 8)[None]
    assert all(torch.equal(a, b) for a, b in zip(rope(x, positions), hf(x, positions), strict=True))


def test_a_worker_never_imports_transformers(tmp_path: Path) -> None:
    """A run on a split with the resolved config, and a run on a split made before it existed (no "decoder" in
    the manifest: resolved at load with transformers), give the same tokens; in the first, the worker does not
    import transformers (the master does, for the tokenizer that turns the token ids into text)."""
    model = make_model(tmp_path / "m", "tiny", "llama", layers=2, seed=4)
    shards = split(model, tmp_path / "s", 2)
    probe = tmp_path / "probe.py"
    probe.write_text("import os, runpy, sys\nsys.argv = ['tpi_mpi.run', *sys.argv[1:]]\n"
                     "try:\n    runpy.run_module('tpi_mpi.run', run_name='__main__')\nfinally:\n"
                     "    print('rank', os.environ['PMI_RANK'], 'transformers imported:',\n"
                     "          'transformers' in sys.modules, flush=True)\n")
    args = [f"model.shards={shards}", "prompt_ids=[1,2,3]", "generation.max_new_tokens=4", "output.results=null"]
    p = mpirun(2, [str(probe), f"hydra.run.dir={tmp_path}/h1", f"output.json={tmp_path}/new.json", *args],
               timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1 transformers imported: False" in p.stdout, p.stdout[-3000:]
    for r in range(2):  # as a split from before: no resolved config
        manifest = shards / f"rank_{r}" / "manifest.json"
        m = json.loads(manifest.read_text())
        del m["decoder"]
        manifest.write_text(json.dumps(m))
    p = mpirun(2, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/h2", f"output.json={tmp_path}/old.json", *args],
               timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    new, old = (json.loads((tmp_path / f"{n}.json").read_text())["token_ids"] for n in ("new", "old"))
    assert new == old and len(new) == 4


def test_the_decoder_modules_import_without_transformers() -> None:
    code = ("import sys, tpi_mpi.run, tpi_mpi.engine, tpi_mpi.job, tpi_mpi.models.llama, tpi_mpi.baselines.pipeline;"
            " print('transformers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "False", p.stdout + p.stderr
