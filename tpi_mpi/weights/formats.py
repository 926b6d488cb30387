"""Weight formats of a split (names, group sizes, bytes per weight), without torch: config and the performance
model use them. The quantization itself and the kernels are in weights/quant.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpi_mpi.errors import UserError

FORMATS = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
# int4 default group size, from docs/quantization.md: 64 is within a few % of 128's speed and close to 32's
# perplexity (both measured there).
DEFAULT_GROUP_SIZE = 64
# model.kernel / tpi_mpi.split --kernel: the hand-written AVX2 kernels where they build (auto), them or an error
# (native), torch's own (torch); models/linear.py runs them, and an int4 split's layout follows (QuantSpec.layout)
MODEL_KERNELS = ("auto", "native", "torch")


@dataclass(frozen=True)
class QuantSpec:
    """How a split stores its linear weights: format none (float), int8, or int4 with a group size."""

    format: str = "none"
    group_size: int | None = None
    # int4 only, how the nibbles are laid out: "rows" (kernels/q8_avx2.c's, the same on every CPU) or "torch"
    # (torch's int4 CPU kernel's, which depends on the CPU's vector width); chosen at split time (--kernel)
    layout: str = "rows"

    @property
    def quantized(self) -> bool:
        return self.format != "none"

    @property
    def label(self) -> str:
        """For names and summary lines: none, int8, int4-g64."""
        return f"int4-g{self.group_size}" if self.format == "int4" else self.format

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "group_size": self.group_size}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> QuantSpec:
        """From a manifest's `quant`: its int4_layout is "rows", or (torch's layout) a fingerprint of the CPU."""
        if not d:
            return cls()
        return cls(d["format"], d.get("group_size"), "rows" if d.get("int4_layout") == "rows" else "torch")


def make_spec(fmt: str | None, group_size: int | None) -> QuantSpec:
    """Validated --quant / --group-size (model.quant / model.group_size)."""
    fmt = fmt or "none"
    if fmt not in FORMATS:
        raise UserError(f"unknown quantization {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt != "int4":
        if group_size is not None:
            raise UserError(f"a group size applies to int4 only (got {group_size} with {fmt}): leave it out")
        return QuantSpec(fmt, None)
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if g not in GROUP_SIZES:
        raise UserError(f"int4 group size {g} is not supported: choose one of {', '.join(map(str, GROUP_SIZES))}")
    return QuantSpec("int4", g)


def bytes_per_weight(spec: QuantSpec, float_bytes: int = 4) -> float:
    """Bytes one linear weight costs on disk and in memory (scales included)."""
    if spec.format == "int8":
        return 1.0  # + 2 bytes per row of K weights, negligible
    if spec.format == "int4":
        assert spec.group_size is not None
        return 0.5 + 4 / spec.group_size  # a bf16 scale and zero per group
    return float(float_bytes)


# The weight formats a run can have, as benchmarks and the performance model name them: a float dtype of the
# whole split (--dtype), or a packed format (--quant, --group-size) with float norms.
WEIGHT_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128")


def parse_weight_format(name: str) -> tuple[str, QuantSpec]:
    """fp32 | fp16 | bf16 | int8 | int4-gG -> (the split's --dtype, its QuantSpec)."""
    if name in ("fp32", "fp16", "bf16"):
        return name, QuantSpec()
    if name == "int8":
        return "auto", QuantSpec("int8")
    if name.startswith("int4-g") and name[6:].isdigit():
        return "auto", make_spec("int4", int(name[6:]))
    raise UserError(f"unknown weight format {name!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
