"""What a rank's decoder needs of a Hugging Face config, resolved once at split time, and RoPE from it.

Reading a config with transformers costs every process that imports it ~4 s of CPU here (transformers pulls in
torch's dynamo and distributed packages: `python -X importtime`), and a rank would only need a handful of values
from it. So `tpi_mpi.split` resolves them with transformers, which knows each model type's defaults and rope
variants, and stores them in every rank's manifest (`"decoder"`):

    hidden_size, num_hidden_layers, vocab_size, rms_norm_eps, max_position_embeddings, eos_token_id,
    windows (per layer: the sliding attention window or None), and rope: inv_freq (fp32 values, one per pair
    of dimensions), attention_scaling, rope_type

A rank builds its `DecoderConfig` and `Rope` from that without importing transformers. RoPE is what HF's
LlamaRotaryEmbedding computes for a rope type whose frequencies do not depend on the sequence length (default,
llama3, linear, yarn, ...): cos and sin of position * inv_freq in fp32, times attention_scaling. For the others
("dynamic", "longrope"), and for splits made before this existed, the manifest has no rope and HF's class runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Rope types whose inv_freq changes with the sequence length: HF's module must compute them at run time.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def hf_config(config: dict[str, Any]) -> Any:
    """The transformers config object of a config.json (the slow import: split time, or old splits)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config["model_type"]].from_dict(config)


def _windows(cfg: Any) -> list[int | None]:
    """Per layer: the attention window, or None for full causal attention (Mistral, some Qwen2)."""
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n


def resolve(config: dict[str, Any]) -> dict[str, Any]:
    """The manifest's "decoder" entry for a config.json (imports transformers)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = hf_config(config)
    rotary = LlamaRotaryEmbedding(cfg)
    rope = None
    if rotary.rope_type not in LENGTH_DEPENDENT_ROPE:
        rope = {"inv_freq": rotary.inv_freq.float().tolist(), "attention_scaling": float(rotary.attention_scaling),
                "rope_type": rotary.rope_type}
    return {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
            "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
            "eos_token_id": cfg.eos_token_id, "windows": _windows(cfg), "rope": rope}


@dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    eos_token_id: int | list[int] | None
    windows: tuple[int | None, ...]
    rope: dict[str, Any] | None  # None: HF's rotary module (hf_source) computes it
    hf_source: dict[str, Any] | None = None  # the config.json, where rope is None

    @classmethod
    def of(cls, config: dict[str, Any], resolved: dict[str, Any] | None) -> DecoderConfig:
        """From a split's manifest entry, or resolved now (with transformers) where the split has none."""
        r = resolved if resolved is not None else resolve(config)
        return cls(r["hidden_size"], r["num_hidden_layers"], r["vocab_size"], r["rms_norm_eps"],
                   r["max_position_embeddings"], r["eos_token_id"], tuple(r["windows"]), r["rope"],
                   None if r["rope"] is not None else config)


class Rope:
    """cos, sin for positions, as HF's LlamaRotaryEmbedding returns them ([1, L, head_dim], in x's dtype)."""

    def __init__(self, cfg: DecoderConfig):
        self.hf: Any = None
        if cfg.rope is None:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

            self.hf = LlamaRotaryEmbedding(hf_config(cfg.hf_source or {}))
            return
        self.inv_freq = torch.tensor(cfg.rope["inv_freq"], dtype=torch.float32)
        self.scaling = cfg.rope["attention_scaling"]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hf is not None:
            return self.hf(x, positions)
        freqs = positions[..., None].float() * self.inv_freq  # as HF's forward, in fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, heads, L, head_dim] rotated as HF's apply_rotary_pos_emb (cos, sin broadcast over the heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)
