"""Split round trip: the rank slices put back together are the original tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tpi_mpi.errors import UserError
from tpi_mpi.make_model import make_model
from tpi_mpi.weights.split import CheckpointReader, block_file, sha256_file, split


@pytest.fixture(scope="module", params=[False, True], ids=["single-file", "indexed"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    over = {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3,
            "attention_bias": True, "mlp_bias": True}
    return make_model(tmp_path_factory.mktemp("m") / "model", "tiny", "llama", layers=2,
                      overrides=over, file_per_layer=request.param)


def test_round_trip(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "s", 3, [0.5, 0.25, 0.25])
    src = CheckpointReader(model)
    manifests = [json.loads((out / f"rank_{r}" / "manifest.json").read_text()) for r in range(3)]
    assert len({m["split_id"] for m in manifests}) == 1
    for r, m in enumerate(manifests):
        assert m["rank"] == r and m["world_size"] == 3
        for name, meta in m["files"].items():  # checksums recorded for every file
            assert sha256_file(out / f"rank_{r}" / name) == meta["sha256"]
    # Only rank 0 has the embedding, head and tokenizer: a worker never needs them.
    assert (out / "rank_0" / "tokenizer.json").is_file()
    assert not list((out / "rank_1").glob("embed*")) and not (out / "rank_1" / "tokenizer.json").exists()
    for layer in range(2):
        p = f"model.layers.{layer}."
        attn = [load_file(out / f"rank_{r}" / block_file(layer, "attn")) for r in range(3)]
        ffn = [load_file(out / f"rank_{r}" / block_file(layer, "ffn")) for r in range(3)]
        for name in ("q_proj", "k_proj", "v_proj"):
            for kind in ("weight", "bias"):
                whole = torch.cat([a[f"{name}.{kind}"] for a in attn], 0)
                assert torch.equal(whole, src.get(p + f"self_attn.{name}.{kind}"))
        assert torch.equal(torch.cat([a["o_proj.weight"] for a in attn], 1), src.get(p + "self_attn.o_proj.weight"))
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(torch.cat([f[f"{name}.weight"] for f in ffn], 0), src.get(p + f"mlp.{name}.weight"))
        assert torch.equal(torch.cat([f["down_proj.weight"] for f in ffn], 1), src.get(p + "mlp.down_proj.weight"))
        # A row-parallel bias lives on rank 0 only: added once before the allreduce.
        assert torch.equal(attn[0]["o_proj.bias"], src.get(p + "self_attn.o_proj.bias"))
        assert "o_proj.bias" not in attn[1] and "down_proj.bias" not in ffn[2]
        assert attn[0]["q_proj.weight"].shape[0] == 1 * 2 * 32  # 1.5 KV groups round to 1: 2 q heads of 32
    # memory.head=split: every rank's rows of lm_head, in proportion to the ratios, the final norm with them
    heads = [load_file(out / f"rank_{r}" / "head_slice.safetensors") for r in range(3)]
    assert torch.equal(torch.cat([h["lm_head.weight"] for h in heads], 0), src.get("lm_head.weight"))
    vocab = src.get("lm_head.weight").shape[0]
    halves = [0, vocab // 2, 3 * vocab // 4, vocab]
    assert [m["vocab_range"] for m in manifests] == [[halves[r], halves[r + 1]] for r in range(3)]
    assert all(torch.equal(h["norm.weight"], src.get("model.norm.weight")) for h in heads)


def test_dtype_conversion(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "s", 2, dtype="fp16")
    t = load_file(out / "rank_1" / block_file(0, "ffn"))
    assert all(v.dtype == torch.float16 for v in t.values())


def test_existing_output_is_never_touched(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        split(model, out, 2)
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(UserError, match="leave rank 1 without a KV head"):
        split(model, tmp_path / "t", 2, [0.9, 0.1])
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.partial*"))


def test_force_replaces_only_when_complete(model: Path, tmp_path: Path) -> None:
    first = split(model, tmp_path / "s", 2)
    old_id = json.loads((first / "rank_0" / "manifest.json").read_text())["split_id"]
    split(model, tmp_path / "s", 3, force=True)
    m = json.loads((tmp_path / "s" / "rank_0" / "manifest.json").read_text())
    assert m["world_size"] == 3 and m["split_id"] != old_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        split(tmp_path / "m", tmp_path / "s", 2)
