"""Weight formats: int8 per output channel and int4 per group of input columns, packed for torch's CPU kernels.

    int8   q int8 [N, K], one bf16 scale per output row: w = q * s (symmetric, q in [-127, 127]).
           Kernel: torch.ops.aten._weight_int8pack_mm (bf16 activations).
    int4   q in [0, 15] per element, one bf16 (scale, zero) pair per group of G input columns:
           w = (q - 8) * s + z. Stored packed two to a byte in one of two layouts (QuantSpec.layout):
           rows   kernels/q8_avx2.c's: row n, block b of 32 columns is 16 bytes, low nibbles columns
                  32b..32b+15, high nibbles 32b+16..32b+31 (as llama.cpp's Q4_0); the same on every CPU
           torch  torch.ops.aten._convert_weight_to_int4pack_for_cpu's, for _weight_int4pack_mm_for_cpu
                  (bf16 activations), where the AVX2 kernel cannot be built (e.g. ARM)
           so that the kernel reads the file's bytes as they are.

torch's kernels (torch==2.13.0) are several times faster with bf16 activations than with fp16 or fp32 (int4
4096x11008: bf16 1.2 ms, fp32 ~200 ms; int8: bf16 2.7 ms, fp32 54 ms), so they get activations rounded to bf16;
the AVX2 kernels quantize activations to int8 in blocks of 32 (kernels/q8_avx2.c says why).

A linear weight `X` of a block is stored as tensors named
    float:  X.weight
    int8:   X.qweight (I8 [N, K]),   X.scales (BF16 [N])
    int4, rows layout:    X.qweight (U8 [N, K/32, 16]), X.scales_zeros (BF16 [N, K/G, 2], row by row: a row's
                          scales are one read, not K/G reads N apart)
    int4, torch's layout: X.qweight (U8 [N, K/2]),      X.scales_zeros (BF16 [K/G, N, 2], the kernel's)
and models/linear.py's `linear(x, tensors, "X")` runs whichever is there (the qweight's rank tells the int4
layouts apart).

torch's int4 layout depends on the CPU's vector width (torch packs blocks of 64 rows with AVX-512, 32 with AVX2):
a split in it records `layout_fingerprint()` of the machine that packed it, and a run on another layout is
refused (one line) before any weight is used.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from tpi_mpi.errors import UserError
from tpi_mpi.weights.formats import GROUP_SIZES, QuantSpec

INT4_ROW_MULTIPLE = 16  # the int4 kernel needs N (output rows) a multiple of 16
# The int8 kernel needs K (input columns) a multiple of 16: measured with torch 2.13, other K give wrong
# results (M = 1) or a segmentation fault (M >= 4).
INT8_COLUMN_MULTIPLE = 16
# lm_head rows (a rank's vocabulary slice) are padded to whole blocks of the int4 layout (64 rows with AVX-512,
# 32 with AVX2), so that any run of whole blocks is a contiguous byte range: the head can be streamed in chunks.
HEAD_ROW_BLOCK = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- quantize / dequantize ---------------------------------------------------------------------------------

def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """x (fp32, >= 0) rounded up to a bf16 value: the stored scale is never below the one the range needs."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    bits = b.view(torch.int16) + low.to(torch.int16)  # next representable value of a positive bf16
    return bits.view(torch.bfloat16)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> q int8 [N, K], bf16 scales [N]; |q * s - w| <= s / 2 for every element."""
    w = w.float()
    s = _bf16_up(w.abs().amax(dim=1) / 127)
    s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row: any scale, q = 0
    q = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> q uint8 [N, K] in [0, 15], bf16 scales_zeros [K/G, N, 2]; |(q - 8) * s + z - w| <= s / 2.

    The zero z (the value at q = 8) is rounded to bf16 first, then the scale is chosen (rounded up) so that
    [z - 8 s, z + 7 s] still covers the group's range: no value is clamped by more than half a step."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"{k} input columns are not a whole number of groups of {group}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    z = (lo + 8 * (hi - lo) / 15).to(torch.bfloat16)
    zf = z.float()
    need = torch.maximum((zf - lo) / 8, (hi - zf) / 7) * (1 + 2**-20)  # a hair above: fp32 rounding of w - z
    s = _bf16_up(need)
    s = torch.where(s == 0, torch.ones_like(s), s)  # a constant group: q = 8 gives z exactly
    q = torch.round((g - zf[..., None]) / s.float()[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.uint8).reshape(n, k)
    sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return q, sz


def dequantize_int4(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """q [N, K] (0..15), scales_zeros [K/G, N, 2] -> fp32 [N, K], as the kernel computes it."""
    n, k = q.shape
    group = k // sz.shape[0]
    s = sz[..., 0].float().t().repeat_interleave(group, dim=1)
    z = sz[..., 1].float().t().repeat_interleave(group, dim=1)
    return (q.float() - 8) * s + z


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] -> uint8 [N, K/2] in the kernel's layout (N a multiple of 16)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 2)


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] (K a multiple of 32) -> uint8 [N, K/32, 16] in the rows layout (module docstring)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).contiguous()


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    n, blocks, _ = packed.shape
    return torch.stack([packed & 15, packed >> 4], dim=2).reshape(n, blocks * 32)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat & 15, flat >> 4], dim=1).reshape(-1)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4 (or of pack_int4_rows, for a 3-d packed tensor): uint8 [N, K/2] -> q [N, K].
    torch's layout is a permutation of nibbles, learnt by packing the digits (base 16) of every element's index:
    no assumption about it is made."""
    if packed.dim() == 3:
        return unpack_int4_rows(packed)
    n, k = packed.shape[0], packed.shape[1] * 2
    idx = torch.arange(n * k, dtype=torch.int64)
    slot_source = torch.zeros(n * k, dtype=torch.int64)
    for d in range(max(1, math.ceil(math.log(n * k, 16)))):
        digit = ((idx >> (4 * d)) & 15).reshape(n, k)
        slot_source |= _nibbles(pack_int4(digit)).to(torch.int64) << (4 * d)
    q = torch.empty(n * k, dtype=torch.uint8)
    q[slot_source] = _nibbles(packed)
    return q.reshape(n, k)


def layout_fingerprint() -> str:
    """A hash of how this machine's torch packs int4 (it depends on the CPU's vector width)."""
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (2 * HEAD_ROW_BLOCK, 64), generator=g, dtype=torch.int32)
    return hashlib.sha256(pack_int4(probe).numpy().tobytes()).hexdigest()[:16]


# --- what a split stores -------------------------------------------------------------------------------------

def quantize_weight(name: str, w: torch.Tensor, spec: QuantSpec, pad_rows_to: int = 1) -> dict[str, torch.Tensor]:
    """The tensors stored for linear weight `name` (without ".weight") in format `spec`. Rows may be padded
    with zeros to a multiple of pad_rows_to (lm_head only; the caller knows the real count)."""
    if not spec.quantized:
        return {f"{name}.weight": w}
    n, k = w.shape
    rows = -(-n // pad_rows_to) * pad_rows_to
    if rows != n:
        w = torch.cat([w, w.new_zeros(rows - n, k)])
    if spec.format == "int8":
        if k % INT8_COLUMN_MULTIPLE:
            raise UserError(f"{name} has {k} input columns, but the int8 kernel needs a multiple of "
                            f"{INT8_COLUMN_MULTIPLE}: this model (or this ratio of ranks) cannot be split as int8")
        q, s = quantize_int8(w)
        return {f"{name}.qweight": q, f"{name}.scales": s}
    assert spec.group_size is not None
    if k % spec.group_size:
        raise UserError(f"int4 group size {spec.group_size} does not divide {name}'s {k} input columns: "
                        f"choose a group size that divides {k} (--group-size {_divisor(k)})")
    if rows % INT4_ROW_MULTIPLE:
        raise UserError(f"{name} has {rows} output rows, but the int4 kernel needs a multiple of "
                        f"{INT4_ROW_MULTIPLE}: use --quant int8 for this model")
    q, sz = quantize_int4(w, spec.group_size)
    if spec.layout == "rows":
        return {f"{name}.qweight": pack_int4_rows(q), f"{name}.scales_zeros": sz.transpose(0, 1).contiguous()}
    return {f"{name}.qweight": pack_int4(q), f"{name}.scales_zeros": sz}


def layout_id(spec: QuantSpec) -> str | None:
    """The manifest's quant.int4_layout: "rows", or torch's layout as a fingerprint of this CPU's packing."""
    if spec.format != "int4":
        return None
    return "rows" if spec.layout == "rows" else layout_fingerprint()


def quantize_head(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """lm_head (or a rank's vocabulary slice): as quantize_weight, but every tensor with one row per vocabulary
    row (scales [N, 1], int4 scales_zeros [N, 2 K/G]) and int4 rows padded to whole layout blocks, so that a run
    of rows is a contiguous read of each tensor (models/head.py streams it so). head_kernel_tensors() turns a
    run of rows back into the kernel's tensors."""
    pad = HEAD_ROW_BLOCK if spec.format == "int4" else 1
    t = quantize_weight("lm_head", w, spec, pad)
    if spec.format == "int8":
        return {"lm_head.qweight": t["lm_head.qweight"], "lm_head.scales_rows": t["lm_head.scales"][:, None]}
    q, sz = t["lm_head.qweight"], t["lm_head.scales_zeros"]
    rows = sz if q.dim() == 3 else sz.transpose(0, 1)  # [N, K/G, 2]
    return {"lm_head.qweight": q, "lm_head.scales_zeros_rows": rows.reshape(rows.shape[0], -1)}


def head_kernel_tensors(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The row-major head tensors of quantize_head (or a run of their rows) as linear() takes them."""
    if "lm_head.scales_rows" in rows:
        return {"lm_head.qweight": rows["lm_head.qweight"], "lm_head.scales": rows["lm_head.scales_rows"][:, 0]}
    q, szr = rows["lm_head.qweight"], rows["lm_head.scales_zeros_rows"]
    sz = szr.reshape(szr.shape[0], -1, 2)  # [N, K/G, 2]: the rows layout's own, torch's wants [K/G, N, 2]
    return {"lm_head.qweight": q, "lm_head.scales_zeros": sz if q.dim() == 3 else sz.transpose(0, 1).contiguous()}


def slice_multiples(spec: QuantSpec) -> tuple[int, int]:
    """(columns, rows) every rank's slice of a weight must be a multiple of (partition.plan_shards)."""
    if spec.format == "int8":
        return INT8_COLUMN_MULTIPLE, 1
    if spec.format == "int4":
        assert spec.group_size is not None
        return spec.group_size, INT4_ROW_MULTIPLE
    return 1, 1


def check_hidden_size(spec: QuantSpec, hidden: int) -> None:
    """The hidden size is the input width of q/k/v, gate/up and lm_head: a whole number of groups (int4)."""
    columns, _ = slice_multiples(spec)
    if hidden % columns:
        what = f"int4 group size {spec.group_size}" if spec.format == "int4" else "the int8 kernel's 16 columns"
        fix = f"choose --group-size {_divisor(hidden)}" if spec.format == "int4" else "use int4 or no --quant"
        raise UserError(f"{what} does not divide the hidden size {hidden} (the input columns of q/k/v, gate/up "
                        f"and lm_head): {fix}")


def _divisor(k: int) -> str:
    ok = [str(g) for g in GROUP_SIZES if k % g == 0]
    return " or ".join(ok) if ok else "none of " + ", ".join(map(str, GROUP_SIZES)) + " fits: use int8"


def dequantize_weight(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """fp32 [N, K] of linear weight `name` as the kernel sees it (padded rows included)."""
    if f"{name}.weight" in tensors:
        return tensors[f"{name}.weight"].float()
    q = tensors[f"{name}.qweight"]
    if q.dtype == torch.int8:
        return dequantize_int8(q, tensors[f"{name}.scales"])
    sz = tensors[f"{name}.scales_zeros"]
    return dequantize_int4(unpack_int4(q), sz.transpose(0, 1) if q.dim() == 3 else sz)


def check_model_dtype(spec: QuantSpec, dtype: torch.dtype | None, stored: torch.dtype) -> None:
    """model.dtype casts weights in memory, but packed weights cannot be cast without undoing the packing: with a
    quantized split model.dtype must be auto or the dtype its float tensors (norms, biases) already have."""
    if spec.quantized and dtype is not None and dtype != stored:
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        raise UserError(f"model.dtype={names.get(dtype, dtype)} cannot be honoured by this {spec.label} split: its "
                        f"weights stay packed (its matmuls take bf16 activations) and its float parts are "
                        f"{names.get(stored, stored)}: set model.dtype=auto, or split again with --dtype")


def out_features(entries: dict[str, Any], name: str) -> int:
    """Output rows of linear weight `name` from a block's header entries (float or packed)."""
    e = entries.get(f"{name}.weight") or entries[f"{name}.qweight"]
    return int(e.shape[0])


def is_quant_tensor(key: str) -> bool:
    """Packed weights and their scales: never cast to model.dtype."""
    return key.endswith((".qweight", ".scales", ".scales_zeros", ".scales_rows", ".scales_zeros_rows"))
