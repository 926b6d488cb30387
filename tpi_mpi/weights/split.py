"""Split a Hugging Face checkpoint into one directory per rank holding only that rank's slices.

    python -m tpi_mpi.split --model models/tiny --out shards/tiny-4 --world-size 4 [--ratios .4,.2,.2,.2]
        [--quant int8|int4 [--group-size 32|64|128]]

Layout of OUT/rank_R/: manifest.json, config.json, one safetensors file per layer block
(layer_0000.attn.safetensors, layer_0000.ffn.safetensors, ...), and head_slice.safetensors: the final norm
and the rank's rows of lm_head (a slice of the vocabulary in proportion to the ratios, for memory.head=split).
Rank 0 also holds the embedding, the whole final norm and lm_head (memory.head=master) and the tokenizer.
A device needs only its own directory.

With --quant int8 or int4 every linear weight of every block and each rank's lm_head rows are stored packed in
the kernel's layout (weights/quant.py), so that a block stays one contiguous read; norms, biases and the
embedding stay float (the checkpoint's dtype, or --dtype). The manifest's "quant" names the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import safe_open

from tpi_mpi.errors import UserError
from tpi_mpi.models import decoder_config
from tpi_mpi.weights import quant, tensorfile
from tpi_mpi.weights.formats import MODEL_KERNELS, QuantSpec, make_spec
from tpi_mpi.weights.partition import ShardPlan, largest_remainder, plan_shards, ranges

FORMAT = "tpi_mpi.shards/2"  # 2: head_slice.safetensors on every rank
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOAT = QuantSpec()  # linear weights as in the checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


def rank_dir(shards: str | Path, rank: int) -> Path:
    return Path(shards) / f"rank_{rank}"


def block_file(layer: int, block: str) -> str:
    return f"layer_{layer:04d}.{block}.safetensors"


def load_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json: give a Hugging Face checkpoint directory")
    config = json.loads(path.read_text())
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported architecture {config.get('model_type')!r} in {path}: "
            f"supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"unsupported hidden_act {config['hidden_act']!r} in {path}: only silu (SwiGLU)")
    return config


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


class CheckpointReader:
    """Reads single tensors or slices of them from a single-file or index-sharded safetensors checkpoint,
    so that the split never holds more than one tensor's slices in memory."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (model_dir / "model.safetensors").is_file():
            with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise UserError(f"{model_dir} has no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are supported)")
        self.dir = model_dir
        self.weight_map: dict[str, str] = weight_map
        self._open: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> Any:
        if name not in self.weight_map:
            raise UserError(f"tensor {name} is missing from the checkpoint in {self.dir}")
        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = safe_open(str(self.dir / fname), "pt")
        return self._open[fname]

    def get(self, name: str) -> torch.Tensor:
        return self._file(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._file(name).get_slice(name)[start:end]

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        return self._file(name).get_slice(name)[:, start:end]


def _write(path: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None,
           spec: QuantSpec = FLOAT) -> dict[str, Any]:
    """Linear weights (quant.LINEARS, lm_head) in format `spec`; every other float tensor cast to `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        name = k.removesuffix(".weight")
        if spec.quantized and k.endswith(".weight") and name in quant.LINEARS:
            out.update(quant.quantize_weight(name, v, spec))
        elif spec.quantized and k == "lm_head.weight":
            out.update(quant.quantize_head(v, spec))  # in row-major pieces: streamed in vocabulary chunks
        else:
            out[k] = v.to(dtype) if dtype else v
    tensorfile.save(path, {k: v.contiguous() for k, v in out.items()})
    return {"bytes": path.stat().st_size, **file_digests(path)}


# Checksums kept in the manifest. xxh3_128 (non-cryptographic, ~10x faster than sha256) is checked every
# time a shard is opened; sha256 on request (model.verify_checksums=sha256), against deliberate changes.
CHECKSUMS: dict[str, Callable[[], Any]] = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_digests(path: Path, names: tuple[str, ...] = tuple(CHECKSUMS)) -> dict[str, str]:
    """The named checksums of a file, read once in 16 MiB chunks."""
    hashes = [CHECKSUMS[n]() for n in names]
    buf = memoryview(bytearray(1 << 24))  # reused: no new 16 MiB object per chunk
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            for h in hashes:
                h.update(buf[:n])
    return {n: h.hexdigest() for n, h in zip(names, hashes, strict=True)}


def sha256_file(path: Path) -> str:
    return file_digests(path, ("sha256",))["sha256"]


def int4_layout_for(spec: QuantSpec, kernel: str) -> QuantSpec:
    """The layout of an int4 split for model.kernel / --kernel `kernel` on this machine."""
    from tpi_mpi.kernels import native

    if kernel not in MODEL_KERNELS:
        raise UserError(f"unknown kernel {kernel!r}: choose one of {', '.join(MODEL_KERNELS)}")
    if spec.format != "int4":
        return spec
    if kernel == "native" and native.load() is None:
        raise UserError(f"--kernel native: the AVX2 kernel cannot be used here: {native.unavailable_reason()}")
    rows = kernel != "torch" and native.load() is not None
    return replace(spec, layout="rows" if rows else "torch")


def split(model: str | Path, out: str | Path, world_size: int, ratios: list[float] | None = None,
          dtype: str = "auto", force: bool = False, quiet: bool = True, quant_format: str = "none",
          group_size: int | None = None, kernel: str = "auto") -> Path:
    """Write OUT/rank_0 .. OUT/rank_{N-1}. The split is written under a temporary name and renamed
    into place at the end, so an interrupted split never leaves a directory that looks complete.
    `kernel` (as model.kernel) picks int4's layout: the AVX2 kernel's rows (auto, where it builds here; native)
    or torch's (torch; auto elsewhere)."""
    model_dir, out = Path(model), Path(out)
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
    spec = int4_layout_for(make_spec(quant_format, group_size), kernel)
    if out.exists() and not force:
        raise UserError(f"{out} already exists: choose another --out, or pass --force to replace it")
    config = load_hf_config(model_dir)
    decoder = decoder_config.resolve(config)
    reader = CheckpointReader(model_dir)
    hd = head_dim(config)
    plan = plan_shards(num_heads=config["num_attention_heads"],
                       num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
                       head_dim=hd, intermediate_size=padded_ffn(config["intermediate_size"], spec),
                       world_size=world_size, ratios=ratios,
                       **dict(zip(("column_multiple", "row_multiple"), quant.slice_multiples(spec), strict=True)))
    quant.check_hidden_size(spec, config["hidden_size"])
    cast = None if dtype == "auto" else DTYPES[dtype]
    tied = bool(config.get("tie_word_embeddings", False)) or not reader.has("lm_head.weight")
    split_id = uuid.uuid4().hex
    remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}-{split_id[:8]}")
    tmp.mkdir(parents=True)
    try:
        files: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for r in range(world_size):
            rank_dir(tmp, r).mkdir()
        _write_master(reader, rank_dir(tmp, 0), files[0], cast, tied, model_dir, spec)
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        vocab = ranges(largest_remainder(reader.shape(head_name)[0], list(plan.ratios)))
        for r, (v0, v1) in enumerate(vocab):
            files[r]["head_slice.safetensors"] = _write(
                rank_dir(tmp, r) / "head_slice.safetensors",
                {"norm.weight": reader.get("model.norm.weight"), "lm_head.weight": reader.rows(head_name, v0, v1)},
                cast, spec)
        t0 = time.time()
        for layer in range(config["num_hidden_layers"]):
            for r in range(world_size):
                d = rank_dir(tmp, r)
                files[r][block_file(layer, "attn")] = _write(
                    d / block_file(layer, "attn"), attn_slices(reader, layer, plan, r), cast, spec)
                files[r][block_file(layer, "ffn")] = _write(
                    d / block_file(layer, "ffn"), ffn_slices(reader, layer, plan, r), cast, spec)
            if not quiet:
                print(f"  split layer {layer + 1}/{config['num_hidden_layers']} "
                      f"({time.time() - t0:.0f}s)", file=sys.stderr)
        for r in range(world_size):
            manifest = {
                "format": FORMAT, "split_id": split_id, "rank": r, "world_size": world_size,
                "source": str(model_dir.resolve()), "dtype": dtype, "tied_embeddings": tied,
                "num_layers": config["num_hidden_layers"], "plan": plan.to_json(), "files": files[r],
                "vocab_range": list(vocab[r]),
                "decoder": decoder,  # what a rank needs of the config, without importing transformers
                # Packed int4 bytes are only valid for a kernel with the same layout (quant.layout_id).
                "quant": {**spec.to_json(), "int4_layout": quant.layout_id(spec),
                          "ffn_padding": padded_ffn(config["intermediate_size"], spec) - config["intermediate_size"]},
            }
            (rank_dir(tmp, r) / "manifest.json").write_text(json.dumps(manifest, indent=1))
            (rank_dir(tmp, r) / "config.json").write_text(json.dumps(config, indent=1))
        if out.exists():  # --force: swap in the new split only once it is complete
            old = out.with_name(f".{out.name}.old-{split_id[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def remove_stale_partials(out: Path) -> None:
    """Remove what a killed split left (its partial directory carries its pid); a running one is kept."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _write_master(reader: CheckpointReader, d: Path, files: dict[str, Any], cast: torch.dtype | None,
                  tied: bool, model_dir: Path, spec: QuantSpec) -> None:
    files["embed.safetensors"] = _write(
        d / "embed.safetensors", {"embed_tokens.weight": reader.get("model.embed_tokens.weight")}, cast)
    head = {"norm.weight": reader.get("model.norm.weight")}
    if not tied:
        head["lm_head.weight"] = reader.get("lm_head.weight")
    elif spec.quantized:  # the embedding stays float: a quantized head of its own (memory.head=master)
        head["lm_head.weight"] = reader.get("model.embed_tokens.weight")
    files["head.safetensors"] = _write(d / "head.safetensors", head, cast, spec)
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, d / name)


def attn_slices(reader: CheckpointReader, layer: int, plan: ShardPlan, rank: int) -> dict[str, torch.Tensor]:
    """q/k/v rows of this rank's heads, o_proj columns of the same heads (row-parallel)."""
    p = f"model.layers.{layer}."
    hd = plan.head_dim
    q0, q1 = plan.q_heads[rank]
    k0, k1 = plan.kv_heads[rank]
    t = {"input_norm.weight": reader.get(p + "input_layernorm.weight")}
    for name, (a, b) in (("q_proj", (q0, q1)), ("k_proj", (k0, k1)), ("v_proj", (k0, k1))):
        t[f"{name}.weight"] = reader.rows(p + f"self_attn.{name}.weight", a * hd, b * hd)
        if reader.has(p + f"self_attn.{name}.bias"):
            t[f"{name}.bias"] = reader.rows(p + f"self_attn.{name}.bias", a * hd, b * hd)
    t["o_proj.weight"] = reader.cols(p + "self_attn.o_proj.weight", q0 * hd, q1 * hd)
    # A row-parallel bias is added once, by rank 0, before the allreduce sums the partials.
    if rank == 0 and reader.has(p + "self_attn.o_proj.bias"):
        t["o_proj.bias"] = reader.get(p + "self_attn.o_proj.bias")
    return t


def padded_ffn(intermediate: int, spec: QuantSpec) -> int:
    """The FFN's width in the split: a quantized split whose kernel needs whole groups of columns (int4: G, int8:
    16) gets dead channels up to the next whole group. Exact: a padded channel has zero gate, up and down weights
    and a zero up bias, so its SiLU(gate) * up is 0 and down_proj adds nothing."""
    unit = math.lcm(*quant.slice_multiples(spec))
    return -(-intermediate // unit) * unit


def _padded(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """t with zeros appended along dim up to `size` (the dead channels of padded_ffn)."""
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def ffn_slices(reader: CheckpointReader, layer: int, plan: ShardPlan, rank: int) -> dict[str, torch.Tensor]:
    """gate/up rows of this rank's FFN columns, down_proj columns of the same (row-parallel). Columns past the
    checkpoint's width (padded_ffn) are zeros."""
    p = f"model.layers.{layer}.mlp."
    a, b = plan.ffn_columns[rank]
    real = reader.shape(p + "up_proj.weight")[0]
    a_in, b_in = min(a, real), min(b, real)
    t = {"post_norm.weight": reader.get(f"model.layers.{layer}.post_attention_layernorm.weight")}
    for name in ("gate_proj", "up_proj"):
        t[f"{name}.weight"] = _padded(reader.rows(p + f"{name}.weight", a_in, b_in), b - a, 0)
        if reader.has(p + f"{name}.bias"):
            t[f"{name}.bias"] = _padded(reader.rows(p + f"{name}.bias", a_in, b_in), b - a, 0)
    t["down_proj.weight"] = _padded(reader.cols(p + "down_proj.weight", a_in, b_in), b - a, 1)
    if rank == 0 and reader.has(p + "down_proj.bias"):
        t["down_proj.bias"] = reader.get(p + "down_proj.bias")
    return t
