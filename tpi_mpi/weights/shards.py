"""A rank's shard directory, as written by tpi_mpi.split: validated before any weight is read."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tpi_mpi.errors import UserError
from tpi_mpi.weights.formats import QuantSpec
from tpi_mpi.weights.partition import ShardPlan
from tpi_mpi.weights.quant import layout_fingerprint
from tpi_mpi.weights.split import FORMAT, block_file, file_digests, rank_dir
from tpi_mpi.weights.tensorfile import TensorFile, parse_header


@dataclass(frozen=True)
class RankShard:
    dir: Path
    rank: int
    world_size: int
    split_id: str
    num_layers: int
    plan: ShardPlan
    config: dict[str, Any]
    tied_embeddings: bool
    vocab_range: tuple[int, int]  # this rank's rows of lm_head in head_slice.safetensors
    quant: QuantSpec = QuantSpec()  # how the linear weights are stored (none: float)
    decoder: dict[str, Any] | None = None  # the config resolved at split time (models/decoder_config.py)

    def block(self, layer: int, kind: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / block_file(layer, kind)))

    def tensor_file(self, layer: int, kind: str) -> TensorFile:
        """The validated header of a layer block (nothing of the weights is read)."""
        return parse_header(self.dir / block_file(layer, kind))

    def block_files(self) -> dict[tuple[int, str], TensorFile]:
        return {(i, k): self.tensor_file(i, k) for i in range(self.num_layers) for k in ("attn", "ffn")}

    def master_file(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / name))

    def master_tensor_file(self, name: str) -> TensorFile:
        return parse_header(self.dir / name)


CHECKSUM_MODES = {"xxh3": "xxh3_128", "sha256": "sha256", "none": None}  # model.verify_checksums -> manifest key


def open_rank_shard(shards: str | Path, rank: int, world_size: int, verify_checksums: str = "xxh3") -> RankShard:
    """Every file's size is checked against the manifest, and its checksum unless verify_checksums=none:
    a file truncated or altered after the split is named before any weight is read from it."""
    d = rank_dir(shards, rank)
    fix = f"split the model with: python -m tpi_mpi.split --model MODEL --out {shards} --world-size {world_size}"
    if not d.is_dir():
        raise UserError(f"shard directory {d} does not exist: {fix}")
    mpath = d / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{d} is not a tpi_mpi shard directory (no readable manifest.json): {fix}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}: {fix}")
    if manifest["world_size"] != world_size:
        raise UserError(
            f"shards in {shards} were split for {manifest['world_size']} ranks but {world_size} were "
            f"started: run with mpirun -n {manifest['world_size']}, or {fix}"
        )
    if manifest["rank"] != rank:
        raise UserError(f"{d} holds the shard of rank {manifest['rank']}, not of rank {rank}: {fix}")
    for name, meta in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise UserError(f"{f} is missing: {fix}")
        if f.stat().st_size != meta["bytes"]:
            raise UserError(f"{f} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}: {fix}")
        algo = CHECKSUM_MODES[verify_checksums]
        if algo is not None and algo not in meta:  # a manifest from before xxh3 was recorded
            algo = "sha256"
        if algo is not None and file_digests(f, (algo,))[algo] != meta[algo]:
            raise UserError(f"{f} does not match its {algo} checksum in the manifest (altered or damaged "
                            f"after the split): {fix}")
    spec = QuantSpec.from_json(manifest.get("quant"))  # splits from before quantization have none
    torch_layout = spec.format == "int4" and spec.layout == "torch"
    if torch_layout and manifest["quant"].get("int4_layout") != layout_fingerprint():
        raise UserError(f"{d} holds int4 weights packed for another CPU's kernel layout (torch packs int4 by the "
                        f"vector width: AVX-512 and AVX2 differ): split the model again on this kind of machine")
    config = json.loads((d / "config.json").read_text())
    return RankShard(
        dir=d, rank=rank, world_size=world_size, split_id=manifest["split_id"],
        num_layers=manifest["num_layers"], plan=ShardPlan.from_json(manifest["plan"]),
        config=config, tied_embeddings=manifest["tied_embeddings"],
        vocab_range=(int(manifest["vocab_range"][0]), int(manifest["vocab_range"][1])), quant=spec,
        decoder=manifest.get("decoder"),  # splits from before it have none: resolved at load, with transformers
    )
