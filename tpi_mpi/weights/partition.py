"""How a model's attention heads and FFN columns are divided among ranks (Megatron-style)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpi_mpi.errors import UserError


def largest_remainder(total: int, ratios: list[float]) -> list[int]:
    """Split `total` items in proportion to `ratios`; leftover items go to the largest remainders.

    Ties go to the lower rank, so the result is deterministic.
    """
    quotas = [total * r for r in ratios]
    counts = [int(q) for q in quotas]
    left = total - sum(counts)
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:left]:
        counts[i] += 1
    return counts


def ranges(counts: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def check_ratios(ratios: list[float] | None, world_size: int) -> list[float]:
    """Equal ratios by default; otherwise N positive numbers summing to 1."""
    if world_size < 1:
        raise UserError(f"world size must be at least 1, got {world_size}")
    if ratios is None or len(ratios) == 0:
        return [1.0 / world_size] * world_size
    ratios = [float(r) for r in ratios]
    if len(ratios) != world_size:
        raise UserError(
            f"{len(ratios)} ratios given for a world size of {world_size}: give one ratio per rank"
        )
    if any(r <= 0 for r in ratios):
        raise UserError(f"ratios must all be positive, got {ratios}")
    if abs(sum(ratios) - 1.0) > 1e-6:
        raise UserError(f"ratios must sum to 1, got {ratios} (sum {sum(ratios):.6g}): rescale them")
    return ratios


@dataclass(frozen=True)
class ShardPlan:
    """Which heads and FFN columns each rank owns. Ranges are half-open [start, end)."""

    world_size: int
    ratios: tuple[float, ...]
    head_dim: int
    group_size: int  # query heads per KV head (GQA)
    kv_heads: tuple[tuple[int, int], ...]
    ffn_columns: tuple[tuple[int, int], ...]

    @property
    def q_heads(self) -> tuple[tuple[int, int], ...]:
        return tuple((a * self.group_size, b * self.group_size) for a, b in self.kv_heads)

    def to_json(self) -> dict:
        return {
            "world_size": self.world_size,
            "ratios": list(self.ratios),
            "head_dim": self.head_dim,
            "group_size": self.group_size,
            "kv_heads": [list(r) for r in self.kv_heads],
            "q_heads": [list(r) for r in self.q_heads],
            "ffn_columns": [list(r) for r in self.ffn_columns],
        }

    @classmethod
    def from_json(cls, d: dict) -> ShardPlan:
        return cls(
            world_size=d["world_size"],
            ratios=tuple(d["ratios"]),
            head_dim=d["head_dim"],
            group_size=d["group_size"],
            kv_heads=tuple(tuple(r) for r in d["kv_heads"]),  # type: ignore[misc]
            ffn_columns=tuple(tuple(r) for r in d["ffn_columns"]),  # type: ignore[misc]
        )


def plan_shards(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    world_size: int,
    ratios: list[float] | None = None,
    column_multiple: int = 1,
    row_multiple: int = 1,
) -> ShardPlan:
    """KV-head groups (a KV head with its query heads) and FFN columns in proportion to the ratios.

    A query head must live with its KV head, so the unit of attention work is the KV group. Quantized splits
    (quant.py) need every slice of a row-parallel weight (o_proj, down_proj: a slice of its input columns) a
    whole number of quantization groups, `column_multiple` columns each, and every column-parallel slice a
    multiple of `row_multiple` output rows: FFN columns and KV groups are then dealt out in such units.
    """
    ratios = check_ratios(ratios, world_size)
    if num_heads % num_kv_heads:
        raise UserError(f"{num_heads} attention heads are not a multiple of {num_kv_heads} KV heads")
    q_per_kv = num_heads // num_kv_heads
    unit = next((u for u in range(1, num_kv_heads + 1) if num_kv_heads % u == 0
                 and (u * q_per_kv * head_dim) % column_multiple == 0 and (u * head_dim) % row_multiple == 0), None)
    if unit is None:
        raise UserError(f"group size {column_multiple} does not divide any slice of the attention heads "
                        f"({num_heads} heads of {head_dim}, {num_kv_heads} KV heads): choose a smaller group size")
    units = num_kv_heads // unit
    what = "KV heads" if unit == 1 else f"units of {unit} KV heads (whole groups of {column_multiple} columns)"
    if world_size > units and unit > 1:
        raise UserError(
            f"group size {column_multiple} does not divide the attention slices of {world_size} ranks: a slice needs "
            f"whole groups, here {unit} KV heads, and the model has {units} such units: use at most {units} ranks "
            "or a smaller group size")
    if world_size > units:
        raise UserError(
            f"world size {world_size} exceeds the model's {units} {what}: every rank needs at least one, "
            f"so use at most {units} ranks"
        )
    kv_counts = [c * unit for c in largest_remainder(units, ratios)]
    for rank, c in enumerate(kv_counts):
        if c == 0:
            raise UserError(
                f"ratios {ratios} leave rank {rank} without a KV head (the model has {units} {what}): "
                f"raise its ratio to at least {1 / units:.3g}"
            )
    ffn_unit = math.lcm(column_multiple, row_multiple)
    if intermediate_size % ffn_unit:
        raise UserError(f"group size {column_multiple} does not divide the FFN's {intermediate_size} columns: "
                        "choose a group size that divides it")
    ffn_counts = [c * ffn_unit for c in largest_remainder(intermediate_size // ffn_unit, ratios)]
    for rank, c in enumerate(ffn_counts):
        if c == 0:
            raise UserError(f"ratios {ratios} leave rank {rank} without FFN columns (groups of {ffn_unit}): "
                            "raise its ratio or choose a smaller group size")
    return ShardPlan(
        world_size=world_size,
        ratios=tuple(ratios),
        head_dim=head_dim,
        group_size=q_per_kv,
        kv_heads=tuple(ranges(kv_counts)),
        ffn_columns=tuple(ranges(ffn_counts)),
    )
