"""Write a standard Hugging Face checkpoint with random weights and a locally trained tokenizer.

No hub access is needed: tests, benchmarks and the demo build their models with this.

    python -m tpi_mpi.make_model --preset tiny --out models/tiny
    python -m tpi_mpi.make_model --preset llama2-70b --layers 4 --dtype fp16 --out models/l70
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import zlib
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tpi_mpi.errors import UserError, main_guard
from tpi_mpi.weights import tensorfile

ARCHS = ("llama", "qwen2", "mistral")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Real layer shapes; the number of layers is what a benchmark reduces.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        # 8 KV heads, so that the demo can run on up to 8 ranks
        hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=8,
        num_hidden_layers=4, vocab_size=None, max_position_embeddings=512,
    ),
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama2-13b": dict(
        hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
        num_hidden_layers=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
        num_hidden_layers=80, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
    "llama3-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=32, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
}

TINY_VOCAB = 512


def train_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE trained on the corpus shipped with the package: deterministic, offline."""
    from tpi_mpi.training.tokenizer import train_bpe

    text = resources.files("tpi_mpi").joinpath("corpus.txt").read_text(encoding="utf-8")
    return train_bpe(text.splitlines(), vocab_size)


def build_config(preset: str, arch: str, layers: int | None, vocab_size: int,
                 overrides: dict[str, Any]) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    kw = dict(PRESETS[preset])
    kw["vocab_size"] = kw["vocab_size"] or vocab_size
    if layers is not None:
        kw["num_hidden_layers"] = layers
    kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "qwen2":
        kw.setdefault("tie_word_embeddings", True)  # the small Qwen2 models tie them
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    config = cls(**kw)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                             "mistral": "MistralForCausalLM"}[arch]]
    return config


def parameter_shapes(config: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF tensor names with their shape and init kind (normal, norm, bias), in checkpoint order."""
    h, inter = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    nq, nkv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
    o_bias = getattr(config, "attention_bias", False)
    mlp_bias = getattr(config, "mlp_bias", False)
    out: dict[str, tuple[tuple[int, ...], str]] = {
        "model.embed_tokens.weight": ((config.vocab_size, h), "normal")
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = ((h,), "norm")
        for name, rows in (("q_proj", nq), ("k_proj", nkv), ("v_proj", nkv)):
            out[p + f"self_attn.{name}.weight"] = ((rows, h), "normal")
            if qkv_bias:
                out[p + f"self_attn.{name}.bias"] = ((rows,), "bias")
        out[p + "self_attn.o_proj.weight"] = ((h, nq), "normal")
        if o_bias:
            out[p + "self_attn.o_proj.bias"] = ((h,), "bias")
        out[p + "post_attention_layernorm.weight"] = ((h,), "norm")
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            out[p + f"mlp.{name}.weight"] = (shape, "normal")
            if mlp_bias:
                out[p + f"mlp.{name}.bias"] = ((shape[0],), "bias")
    out["model.norm.weight"] = ((h,), "norm")
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ((config.vocab_size, h), "normal")
    return out


def random_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int, std: float) -> torch.Tensor:
    # One generator per tensor, seeded by its name: the same tensor whatever the file layout.
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g)
    if kind == "norm":  # not all ones, so that a norm applied wrongly shows in the tests
        return 1.0 + 0.1 * t
    return t * std


def make_model(out: str | Path, preset: str = "tiny", arch: str = "llama", layers: int | None = None,
               seed: int = 0, dtype: str = "fp32", overrides: dict[str, Any] | None = None,
               file_per_layer: bool | None = None, quiet: bool = True) -> Path:
    """Write config.json, safetensors weights and tokenizer files to `out` and return it.

    Tensors are generated and written one layer at a time, so a 70B-shaped preset needs about one
    layer's worth of memory. With file_per_layer (default: when the weights exceed 1 GB) the
    checkpoint is sharded with a model.safetensors.index.json, like large hub checkpoints.
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose fp32, fp16 or bf16")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new --out or remove it")
    tokenizer = train_tokenizer(TINY_VOCAB)
    config = build_config(preset, arch, layers, len(tokenizer), overrides or {})
    config.dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    shapes = parameter_shapes(config)
    elem = torch.tensor([], dtype=DTYPES[dtype]).element_size()
    total = sum(torch.Size(s).numel() for s, _ in shapes.values()) * elem
    if file_per_layer is None:
        file_per_layer = total > 1 << 30

    def file_of(name: str) -> str:
        if not file_per_layer:
            return "model.safetensors"
        if name.startswith("model.layers."):
            return f"model-layer-{int(name.split('.')[2]):05d}.safetensors"
        return "model-embed.safetensors" if "embed_tokens" in name else "model-head.safetensors"

    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=False)
    try:
        _write_checkpoint(tmp, shapes, file_of, seed, config, dtype, total, file_per_layer, quiet)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # empty, checked above
            out.rmdir()
        tmp.rename(out)  # atomic: a directory named `out` is always complete
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_checkpoint(tmp: Path, shapes: dict[str, Any], file_of: Any, seed: int, config: Any, dtype: str,
                      total: int, file_per_layer: bool, quiet: bool) -> None:
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(file_of(name), []).append(name)
    t0 = time.time()
    for i, (fname, names) in enumerate(groups.items()):
        tensors = {n: random_tensor(n, shapes[n][0], shapes[n][1], seed, config.initializer_range)
                   .to(DTYPES[dtype]) for n in names}
        tensorfile.save(tmp / fname, tensors, metadata={"format": "pt"})
        del tensors
        if not quiet:
            print(f"  wrote {fname} ({i + 1}/{len(groups)}, {time.time() - t0:.0f}s)", file=sys.stderr)
    if file_per_layer:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, ns in groups.items() for n in ns}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.make_model", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help=f"one of: {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--out", required=True, help="new directory for the checkpoint")
    p.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    p.add_argument("--arch", default="llama", choices=ARCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set num_attention_heads=5 (JSON values)")
    args = p.parse_args(argv)
    try:
        out = make_model(args.out, args.preset, args.arch, args.layers, args.seed, args.dtype,
                         parse_overrides(args.set), quiet=False)
    except UserError as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr)  # the one error line every entry point prints
        return 2
    print(f"wrote {args.preset} ({args.arch}) checkpoint to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
