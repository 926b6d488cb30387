"""The matmul of every weight format: `linear(x, tensors, "X")` runs linear weight X of a block, float or packed.

    int8 (weights/quant.py)    kernels/q8_avx2.c: activations quantized to int8 in blocks of 32, integer dot
                               products (where it builds: x86-64 with AVX2; model.kernel), else torch's
    int4                       torch's CPU kernel, bf16 activations (quant.py says why)
    fp32, one row (decoding)   split by output rows over the rank's threads (float_linear says why)
    fp32, several rows         oneDNN (prefill)
    fp16, several rows         oneDNN in fp32 on converted row chunks of the weight (prefill)
    otherwise                  torch.nn.functional.linear
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from tpi_mpi.config import MODEL_KERNELS
from tpi_mpi.errors import UserError
from tpi_mpi.kernels import native
from tpi_mpi.weights.formats import QuantSpec
from tpi_mpi.weights.quant import quantize_weight

_use_native: bool | None = None  # None: not chosen yet (auto on first use)


def linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x [M, K] times linear weight `name` (float or packed) plus its bias if stored, in x's dtype."""
    bias = tensors.get(f"{name}.bias")
    w = tensors.get(f"{name}.weight")
    if w is not None:
        return float_linear(x, w, bias)
    q = tensors[f"{name}.qweight"]
    if q.dtype == torch.int8 and _native_int8() and x.dim() == 2:
        y = _int8_native(x, q, tensors[f"{name}.scales"]).to(x.dtype)
        return y + bias if bias is not None else y
    xb = x.to(torch.bfloat16).contiguous()
    if q.dtype == torch.int8:
        y = torch.ops.aten._weight_int8pack_mm(xb, q, tensors[f"{name}.scales"])
    else:
        sz = tensors[f"{name}.scales_zeros"]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q, xb.shape[-1] // sz.shape[0], sz)
    y = y.to(x.dtype)
    return y + bias if bias is not None else y


def select_kernel(kind: str) -> None:
    """model.kernel: auto (the hand-written int8 kernel where it builds, else torch's), native (it, or one line
    saying why not), torch (torch's kernels only, e.g. to compare)."""
    global _use_native
    if kind not in MODEL_KERNELS:
        raise UserError(f"model.kernel={kind} is not one of {', '.join(MODEL_KERNELS)}")
    if kind == "native" and native.load() is None:
        raise UserError(f"model.kernel=native: the int8 kernel cannot be used here: {native.unavailable_reason()}; "
                        "set model.kernel=auto (torch's kernels) or torch")
    _use_native = kind != "torch" and native.load() is not None


def _native_int8() -> bool:
    if _use_native is None:
        select_kernel("auto")
    return bool(_use_native)


def int8_kernel() -> str:
    """The kernel int8 weights run on here (the run record's weights.kernel)."""
    return "q8-avx2" if _native_int8() else "torch"


def _int8_native(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int8 q [N, K] with bf16 row scales, by q8_avx2.c: fp32 [M, N]."""
    lib = native.load()
    assert lib is not None
    m, k = x.shape
    n = q.shape[0]
    x32, q, scales = x.float().contiguous(), q.contiguous(), scales.contiguous()
    blocks = -(-k // native.BLOCK)
    xq = torch.empty((m, blocks * native.BLOCK), dtype=torch.int8)
    xs = torch.empty((m, blocks), dtype=torch.float32)
    lib.q8_quantize(x32.data_ptr(), m, k, xq.data_ptr(), xs.data_ptr())
    y = torch.empty((m, n), dtype=torch.float32)
    args = (q.data_ptr(), scales.data_ptr(), k)
    tail = (xq.data_ptr(), xs.data_ptr(), m, y.data_ptr(), n)
    _by_rows(n, lambda a, b: lib.q8_matmul_int8(*args, a, b, *tail))
    return y


# fp32 one-token products are split by output rows over the rank's threads: torch's fp32 path for one row of
# activations (MKL's gemv here) uses one thread however many it has (4096x11008: 7.44 ms at 1 thread, 7.42 at 2),
# so a rank with 2 threads would read its weights at one thread's bandwidth. Each part is an mm into its own
# columns of the output, so the result is the same bits as the one-thread product of that part.
PARALLEL_MIN_ROWS = 512  # per thread: below this the hand-off costs more than it saves
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def _mm_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    with torch.inference_mode():  # a pool thread does not inherit the caller's mode
        torch.mm(x, w.t(), out=out)


def _by_rows(n: int, work: Callable[[int, int], object]) -> None:
    """work(a, b) for output rows [a, b) split in multiples of 16 over the rank's threads (one part here, the
    rest in a pool; ctypes and torch release the GIL), or all here when n is too small to pay for the hand-off."""
    global _pool, _pool_threads
    threads = torch.get_num_threads()
    if threads < 2 or n < PARALLEL_MIN_ROWS * threads:
        work(0, n)
        return
    if _pool is None or _pool_threads != threads:
        if _pool is not None:
            _pool.shutdown()
        _pool, _pool_threads = ThreadPoolExecutor(threads - 1, thread_name_prefix="rows"), threads
    bounds = [n * i // threads // 16 * 16 for i in range(threads)] + [n]
    parts = [_pool.submit(work, a, b) for a, b in zip(bounds[1:-1], bounds[2:], strict=True)]
    work(0, bounds[1])
    for f in parts:
        f.result()


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if torch.is_grad_enabled() or x.dim() != 2:  # the kernels below are for inference
        return F.linear(x, w, bias)
    if w.dtype == torch.float32:
        return _fp32_rows(x, w, bias) if x.shape[0] == 1 else _onednn(x, w, bias)
    if w.dtype == torch.float16 and x.shape[0] > 1:
        return _fp16_by_chunks(x, w, bias)
    return F.linear(x, w, bias)  # fp16 one row, bf16: torch's own use every thread


def _fp32_rows(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    n = w.shape[0]
    if torch.get_num_threads() < 2 or n < PARALLEL_MIN_ROWS * torch.get_num_threads():
        return F.linear(x, w, bias)
    out = torch.empty((1, n), dtype=x.dtype)
    x = x.contiguous()
    _by_rows(n, lambda a, b: _mm_into(x, w[a:b], out[:, a:b]))
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
# the fp32 time). So the weight is converted to fp32, which is exact, a chunk of rows at a time into a buffer that
# stays in cache, and multiplied there in fp32 (as a fp16 matmul accumulates); the output is rounded to fp16.
FP16_CHUNK_BYTES = 8 * 2**20


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
