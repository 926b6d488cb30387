"""bench.llamacpp without llama.cpp: its names and q/k permutation for GGUF, and its one-line errors. (The runs
themselves need a llama.cpp build, which this machine has no binary of; docs/quantization.md says how to make one.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tpi_mpi.bench.llamacpp import gguf_name, permute_rope
from tpi_mpi.errors import UserError


def test_hf_names_map_to_llama_cpps() -> None:
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.norm.weight") == "output_norm.weight"
    assert gguf_name("model.layers.3.self_attn.k_proj.weight") == "blk.3.attn_k.weight"
    assert gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert gguf_name("model.layers.12.post_attention_layernorm.weight") == "blk.12.ffn_norm.weight"
    with pytest.raises(UserError, match="not a tensor"):
        gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_permutation_turns_rotate_half_pairs_into_neighbours() -> None:
    """HF's RoPE pairs row i with row i + dim/2 of each head; llama.cpp's pairs rows 2i and 2i+1: after the
    permutation, each head's rows are (0, d/2, 1, d/2+1, ...), and the columns move with their rows."""
    heads, dim, cols = 3, 8, 5
    w = torch.arange(heads * dim).repeat_interleave(cols).reshape(heads * dim, cols).numpy()
    got = permute_rope(w, heads)[:, 0].reshape(heads, dim)
    for h in range(heads):
        assert got[h].tolist() == [h * dim + j for i in range(dim // 2) for j in (i, i + dim // 2)]
    assert (permute_rope(w, heads)[:, 1:] == permute_rope(w, heads)[:, :1]).all()


def test_a_missing_llama_cpp_tree_is_one_line(tmp_path) -> None:
    p = subprocess.run([sys.executable, "-m", "tpi_mpi.bench.llamacpp", "--llama-cpp", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        f"tpi_mpi: error: {tmp_path}/build/bin/llama-bench does not exist: --llama-cpp is a built llama.cpp tree "
        "(docs/quantization.md)"]
