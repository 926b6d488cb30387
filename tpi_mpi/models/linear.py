"""The matmul of every weight format: `linear(x, tensors, "X")` runs linear weight X of a block, float or packed.

    int8 (weights/quant.py)    kernels/q8_avx2.c: activations quantized to int8 in blocks of 32, integer dot
                               products (where it builds: x86-64 with AVX2; model.kernel), else torch's
    int4, rows layout          kernels/q8_avx2.c likewise (the layout is chosen at split time)
    int4, torch's layout       torch's CPU kernel, bf16 activations (quant.py says why)
    fp32, one row (decoding)   kernels/f32_avx2.c (model.kernel), else split by output rows over the rank's threads
                               (kernels/rows.py says why)
    fp32, 2-16 rows            kernels/prefill_avx512.c where the CPU has AVX-512, else prefill_avx2.c (model.kernel)
    fp32, more rows            oneDNN
    fp16, one row (decoding)   kernels/f16_avx2.c, or f16_avx512.c with AVX-512F (where our kernels build;
                               model.kernel), else torch's
    fp16, 2-64 rows            torch's F.linear where the CPU has AVX-512-FP16, else kernels/prefill_avx512.c with
                               AVX-512, else prefill_avx2.c (model.kernel)
    fp16, more rows            oneDNN in fp32 on converted row chunks of the weight (prefill)
    otherwise                  torch.nn.functional.linear
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tpi_mpi.errors import UserError
from tpi_mpi.kernels import native, rows
from tpi_mpi.weights.formats import MODEL_KERNELS, QuantSpec
from tpi_mpi.weights.quant import quantize_weight

_use_native: bool | None = None  # None: not chosen yet (auto on first use)


def linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x [M, K] times linear weight `name` (float or packed) plus its bias if stored, in x's dtype."""
    bias = tensors.get(f"{name}.bias")
    w = tensors.get(f"{name}.weight")
    if w is not None:
        return float_linear(x, w, bias)
    q = tensors[f"{name}.qweight"]
    if q.dim() == 3:  # int4 in the rows layout: only the AVX2 kernel reads it (select_kernel checked it can)
        y = native.int4_matmul(_rows2d(x), q, tensors[f"{name}.scales_zeros"]).reshape(*x.shape[:-1], -1)
    elif q.dtype == torch.int8 and native_kernels():
        y = native.int8_matmul(_rows2d(x), q, tensors[f"{name}.scales"]).reshape(*x.shape[:-1], -1)
    else:
        xb = x.to(torch.bfloat16).contiguous()
        if q.dtype == torch.int8:
            y = torch.ops.aten._weight_int8pack_mm(xb, q, tensors[f"{name}.scales"])
        else:
            sz = tensors[f"{name}.scales_zeros"]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q, xb.shape[-1] // sz.shape[0], sz)
    y = y.to(x.dtype)
    return y + bias if bias is not None else y


def linears(x: torch.Tensor, tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor]:
    """[linear(x, tensors, n) for n in names], the same values; where all of them are packed for our kernels
    (int8 with model.kernel choosing ours, or int4 in the rows layout), or all fp16 at one row (decoding), in one
    kernel call: the activations are quantized once and the threads started once for q/k/v (or gate/up), not once
    per matrix."""
    qs = [tensors.get(f"{n}.qweight") for n in names]
    ws = [tensors.get(f"{n}.weight") for n in names]
    dtypes = {w.dtype if w is not None else None for w in ws}
    fp16 = dtypes == {torch.float16} and _one_row(x)
    fp32 = dtypes == {torch.float32} and _one_row(x) and x.dtype == torch.float32
    if fp16 or fp32:
        ys = (native.fp16_matvecs if fp16 else native.fp32_matvecs)(x, [w for w in ws if w is not None])
    elif all(q is not None and q.dim() == 3 for q in qs):
        ys = native.int4_matmuls(_rows2d(x), [(tensors[f"{n}.qweight"], tensors[f"{n}.scales_zeros"]) for n in names])
    elif all(q is not None and q.dtype == torch.int8 for q in qs) and native_kernels():
        ys = native.int8_matmuls(_rows2d(x), [(tensors[f"{n}.qweight"], tensors[f"{n}.scales"]) for n in names])
    else:
        return [linear(x, tensors, n) for n in names]
    out = []
    for n, y in zip(names, ys, strict=True):
        y = y.reshape(*x.shape[:-1], -1)
        bias = tensors.get(f"{n}.bias")
        if fp16 or fp32:  # as float_linear: the bias added to the fp32 sums, then one rounding
            out.append((y + bias.float() if bias is not None else y).to(x.dtype))
        else:
            y = y.to(x.dtype)
            out.append(y + bias if bias is not None else y)
    return out


def _one_row(x: torch.Tensor) -> bool:
    """Whether a float weight's product with x runs on our one-row kernels (kernels/f16_avx2.c, f32_avx2.c): one row
    at inference, our kernels chosen."""
    return x.dim() == 2 and x.shape[0] == 1 and not torch.is_grad_enabled() and native_kernels()


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def select_kernel(kind: str, spec: QuantSpec | None = None) -> None:
    """model.kernel for this process: auto (the hand-written AVX2 kernels where they build, else torch's), native
    (them, or one line saying why not), torch (torch's only, e.g. to compare). With the split's `spec`, also
    checks that its int4 layout can be run: the rows layout needs the AVX2 kernel, torch's layout torch's."""
    global _use_native
    if kind not in MODEL_KERNELS:
        raise UserError(f"model.kernel={kind} is not one of {', '.join(MODEL_KERNELS)}")
    lib = native.load()
    if spec is not None and spec.format == "int4" and spec.layout == "rows":
        if kind == "torch":
            raise UserError("model.kernel=torch cannot run this split: its int4 weights are in the AVX2 kernel's "
                            "rows layout: set model.kernel=auto, or split again with --kernel torch")
        if lib is None:
            raise UserError(f"this split's int4 weights are in the AVX2 kernel's rows layout, and that kernel cannot "
                            f"be used here: {native.unavailable_reason()}: split again here (tpi_mpi.split "
                            f"--kernel torch, or model.kernel=torch) for torch's layout")
    elif spec is not None and spec.format == "int4" and kind == "native":
        raise UserError("model.kernel=native cannot run this split: its int4 weights are in torch's layout: set "
                        "model.kernel=auto, or split again with --kernel native")
    if kind == "native" and lib is None:
        raise UserError(f"model.kernel=native: the AVX2 kernel cannot be used here: {native.unavailable_reason()}; "
                        "set model.kernel=auto (torch's kernels) or torch")
    _use_native = kind != "torch" and lib is not None


def native_kernels() -> bool:
    """Whether model.kernel chose our kernels (kernels/native.py) and they could be built here."""
    if _use_native is None:
        select_kernel("auto")
    return bool(_use_native)


def kernel_name(spec: QuantSpec, float_dtype: torch.dtype | None = None) -> str | None:
    """The kernel the packed weights of `spec` run on here (the run record's weights.kernel); for float weights,
    the one fp16 decoding runs on, and None for the other float dtypes (torch's, always)."""
    if not spec.quantized:
        return (native.fp16_decode_kernel() if native_kernels() else "torch") if float_dtype == torch.float16 else None
    ours = f"q8-{native.isa()}"  # q8-avx2, or q8-avx512-vnni where the CPU has it (kernels/q8_avx512.c)
    if spec.format == "int4":
        return ours if spec.layout == "rows" else "torch"
    return ours if native_kernels() else "torch"


def _mm_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    with torch.inference_mode():  # a pool thread does not inherit the caller's mode
        torch.mm(x, w.t(), out=out)


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.is_grad_enabled() or x.dim() != 2:  # the kernels below are for inference
        return F.linear(x, w, bias)
    if w.dtype == torch.float32:
        if x.shape[0] == 1:
            if x.dtype == torch.float32 and _one_row(x):
                y = native.fp32_matvecs(x, [w])[0]  # kernels/f32_avx2.c says why
                return y + bias if bias is not None else y
            return _fp32_rows(x, w, bias)
        if x.shape[0] <= native.PREFILL_MAX_ROWS and native_kernels():
            y = native.fp32_matmul(x, w)  # a short prompt: kernels/prefill_avx512.c and prefill_avx2.c say why
            return y + bias if bias is not None else y
        return _onednn(x, w, bias)
    if w.dtype == torch.float16 and x.shape[0] > 1:
        if FP16_MATMUL_IN_HARDWARE:
            return F.linear(x, w, bias)
        if x.shape[0] <= FP16_PREFILL_MAX_ROWS and native_kernels():
            y = native.fp16_matmul(x, w)  # a short prompt: kernels/prefill_avx2.c and prefill_avx512.c say why
            return (y + bias.float() if bias is not None else y).to(x.dtype)
        return _fp16_by_chunks(x, w, bias)
    if w.dtype == torch.float16 and _one_row(x):
        y = native.fp16_matvec(x, w)  # fp32 sums, rounded once to x's dtype, as torch's fp16 product
        return (y + bias.float() if bias is not None else y).to(x.dtype)
    return F.linear(x, w, bias)  # bf16 (and fp16 without the AVX2 kernels): torch's own use every thread


def _fp32_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One row of fp32 activations: split by output rows over the rank's threads (kernels/rows.py says why)."""
    n = w.shape[0]
    if not rows.worth_splitting(n):
        return F.linear(x, w, bias)
    out = torch.empty((1, n), dtype=x.dtype)
    x = x.contiguous()
    rows.by_rows(n, lambda a, b: _mm_into(x, w[a:b], out[:, a:b]))
    return out + bias if bias is not None else out


# Prefill (several rows) in fp32 goes to oneDNN rather than to torch's default (MKL here): on this AMD CPU MKL's
# sgemm was 2.5x slower for 16 rows of 4096 x 11008 (188 vs 74 ms, one thread, loaded machine; docs/quantization.md).
def _onednn_available() -> bool:
    try:
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 16), torch.ones(16, 16), None, "none", [], "")
        return torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


def _onednn(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if not ONEDNN:
        return F.linear(x, w, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, "none", [], "")


# fp16 prefill: torch has no fast fp16 matmul on a CPU without AVX-512-FP16 (16 rows of 4096 x 11008: 267 ms, 3.6x
# the fp32 time). A prompt of 2..64 rows goes to kernels/prefill_avx2.c, which widens each weight as it
# loads it; longer ones, or without our kernels: the weight is converted to fp32, which is exact, a chunk of rows at
# a time into a buffer that stays in cache, and multiplied there in fp32 (as a fp16 matmul accumulates). Either way
# the output is rounded to fp16 once.
# Where the CPU has AVX-512-FP16 (Intel since Sapphire Rapids), torch's own fp16 matmul (oneDNN) is the faster:
# 16 rows of 4096 x 11008, 2 threads, 8.6 ms against 16.9 by chunks, with the same bits (3 December 2026).
# Up to 64 rows prefill_avx2.c is the faster (11008 x 4096 and 4096 x 11008, 2 threads: 24 rows 115-122 GFLOP/s
# against 62-76 by chunks, 48 rows 123-132 against 63-93, 64 rows 88-112 against 80-83; 256 rows 132 against 120-135:
# AMD EPYC Zen 3, 4 December 2026). Its fp32 twin is ahead of oneDNN only to 16 rows (native.PREFILL_MAX_ROWS).
FP16_PREFILL_MAX_ROWS = 64
FP16_CHUNK_BYTES = 8 * 2**20
FP16_MATMUL_IN_HARDWARE = "avx512_fp16" in native.cpu_flags()


def _fp16_by_chunks(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    rows = max(64, FP16_CHUNK_BYTES // (4 * k))
    x32 = x.float().contiguous()
    out = torch.empty((x.shape[0], n), dtype=x.dtype)
    buf = torch.empty((min(rows, n), k), dtype=torch.float32)  # one buffer for every chunk: no page faults
    for a in range(0, n, rows):
        b = min(n, a + rows)
        chunk = buf[:b - a]
        chunk.copy_(w[a:b])
        out[:, a:b] = _onednn(x32, chunk, bias[a:b].float() if bias is not None else None)
    return out


# --- for benchmarks and the performance model ----------------------------------------------------------------

def random_weight(spec: QuantSpec, n: int, k: int, dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """A random linear weight `w` [n, k] stored as a split stores it (packed for int8/int4, else `dtype`)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    return quantize_weight("w", w, spec) if spec.quantized else {"w.weight": w.to(dtype)}


def time_linear(spec: QuantSpec, n: int, k: int, m: int = 1, dtype: torch.dtype = torch.float32,
                distinct: int = 4, repeats: int = 7) -> float:
    """Median seconds of one [m, k] x [k, n] product in this format with torch's current threads. `distinct`
    weights are used in turn so that they do not all sit in the last-level cache (a decode step reads each once)."""

    ws = [random_weight(spec, n, k, dtype, seed=i) for i in range(distinct)]
    x = torch.randn(m, k).to(dtype if not spec.quantized else torch.float32)
    times = []
    with torch.inference_mode():
        for w in ws:
            linear(x, w, "w")  # first-call costs (thread pool, packing buffers) out of the timing
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in ws:
                linear(x, w, "w")
            times.append((time.perf_counter() - t0) / distinct)
    return sorted(times)[len(times) // 2]
