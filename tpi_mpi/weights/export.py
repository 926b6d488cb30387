"""A split put back together as a Hugging Face checkpoint (fp32), with the weights the split computes with: every
rank's slices dequantized (weights/quant.py) and joined in rank order.

    dequantized_checkpoint(SHARDS, OUT)

This is the one-process reference of a quantized split: transformers run on it uses the same quantized values as
the tensor-parallel run (tests/test_quant.py), so what is left between the two is the kernels' bf16 activations.
lm_head is written on its own (tie_word_embeddings=false): a quantized split's head is no longer the embedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tpi_mpi.weights import quant
from tpi_mpi.weights.split import TOKENIZER_FILES, block_file, rank_dir


def _cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return torch.cat(parts, dim=dim).contiguous()


def dequantized_checkpoint(shards: str | Path, out: str | Path) -> Path:
    shards, out = Path(shards), Path(out)
    manifest = json.loads((rank_dir(shards, 0) / "manifest.json").read_text())
    n = manifest["world_size"]
    config = json.loads((rank_dir(shards, 0) / "config.json").read_text())
    t: dict[str, torch.Tensor] = {}
    for layer in range(manifest["num_layers"]):
        p = f"model.layers.{layer}."
        attn = [load_file(str(rank_dir(shards, r) / block_file(layer, "attn"))) for r in range(n)]
        ffn = [load_file(str(rank_dir(shards, r) / block_file(layer, "ffn"))) for r in range(n)]
        t[p + "input_layernorm.weight"] = attn[0]["input_norm.weight"]
        t[p + "post_attention_layernorm.weight"] = ffn[0]["post_norm.weight"]
        # column-parallel weights join by rows, row-parallel ones by columns; a row-parallel bias is rank 0's
        for blocks, prefix, names in ((attn, "self_attn.", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                      (ffn, "mlp.", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                row_parallel = name in ("o_proj", "down_proj")
                t[p + prefix + name + ".weight"] = _cat([quant.dequantize_weight(b, name) for b in blocks],
                                                        1 if row_parallel else 0)
                if f"{name}.bias" in blocks[0]:
                    t[p + prefix + name + ".bias"] = (blocks[0][f"{name}.bias"] if row_parallel else
                                                      _cat([b[f"{name}.bias"] for b in blocks], 0))
    t["model.embed_tokens.weight"] = load_file(str(rank_dir(shards, 0) / "embed.safetensors"))["embed_tokens.weight"]
    heads = []
    for r in range(n):
        m = json.loads((rank_dir(shards, r) / "manifest.json").read_text())
        head = load_file(str(rank_dir(shards, r) / "head_slice.safetensors"))
        t["model.norm.weight"] = head["norm.weight"]
        rows = m["vocab_range"][1] - m["vocab_range"][0]
        heads.append(quant.dequantize_weight(quant.head_kernel_tensors(head) if "lm_head.qweight" in head else head,
                                             "lm_head")[:rows])
    t["lm_head.weight"] = _cat(heads, 0)
    config.update(intermediate_size=t["model.layers.0.mlp.up_proj.weight"].shape[0], tie_word_embeddings=False,
                  dtype="float32")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in TOKENIZER_FILES:
        if (rank_dir(shards, 0) / name).is_file():
            shutil.copy2(rank_dir(shards, 0) / name, out / name)
    return out
