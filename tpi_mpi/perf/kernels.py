"""The speed of each weight format's kernel, measured for the performance model's calibration.

Decode (one token) reads every weight once, so a format's speed is bytes/s of its weights through its
matrix-vector kernel; prefill (a prompt of q tokens) is FLOP/s of the same kernel on q rows, given relative to
fp32's. The kernels are called as the quantized decoder calls them (activations in bf16 where the kernel needs it):

    fp32, fp16, bf16   models/linear.py's float_linear(x, W), x in W's dtype: for one row, fp32 split over the
                       threads and fp16 by the AVX2 kernel (kernels/f16_avx2.c) where it builds; else F.linear
    int8               models/linear.py's linear(): the hand-written AVX2 kernel (kernels/q8_avx2.c) where it
                       builds, else torch.ops.aten._weight_int8pack_mm (model.kernel=auto)
    int4-gG            likewise, the AVX2 kernel on the rows layout where it builds, else
                       torch.ops.aten._weight_int4pack_mm_for_cpu(x bf16, W packed uint8 [N, K/2], G,
                       scales_and_zeros bf16 [K/G, N, 2]) on torch's layout

A layer's matrices are Llama-2-7B's FFN shape (11008 x 4096), several distinct copies in turn, at least
`MIN_BYTES` of them per format: a single matrix (180 MB in fp32, 23 MB in int4) would be served from this
host's 260 MB L3 cache and overstate the speed a forward pass sees. The copies hold the same values: the
speed of these kernels does not depend on them, only on where the bytes come from. The memory read bandwidth
(a sum over a large tensor) is measured beside them, so that each kernel's fraction of the physical bound
is known (the paper's devices get that fraction of their own bandwidth).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tpi_mpi.perf.measure import median_time
from tpi_mpi.perf.shapes import WeightFormat, weight_format

FORMAT_KEYS = ("fp32", "fp16", "bf16", "int8", "int4-g32", "int4-g64", "int4-g128")
N_OUT, K_IN = 11008, 4096  # Llama-2-7B's gate/up projection
MIN_BYTES = 720 << 20  # per format: ~3 x the L3 cache
PROMPT = 16  # prefill rows


def format_kernel(fmt: WeightFormat, copies: int) -> tuple[Callable[[Any, Any], Any], list[Any], Any]:
    """(product(x, weights) -> y, `copies` distinct weights of the layer shape, the activations' dtype)."""
    import torch

    if fmt.name in ("fp32", "fp16", "bf16"):
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[fmt.name]
        w = torch.randn(N_OUT, K_IN).to(dtype)
        from tpi_mpi.models.linear import float_linear

        def linear(x: Any, m: Any) -> Any:
            with torch.inference_mode():  # float_linear's own kernels are for inference
                return float_linear(x, m, None)

        return linear, [w] + [w.clone() for _ in range(copies - 1)], dtype
    if fmt.name == "int8":
        q = torch.randint(-127, 128, (N_OUT, K_IN), dtype=torch.int8)
        s = (torch.rand(N_OUT) / 127).to(torch.bfloat16)

        from tpi_mpi.models.linear import linear as run_linear

        def int8(x: Any, m: Any) -> Any:
            return run_linear(x, m, "w")

        copy = {"w.qweight": q, "w.scales": s}
        return int8, [copy] + [{k: v.clone() for k, v in copy.items()} for _ in range(copies - 1)], torch.float32
    assert fmt.name == "int4" and fmt.group_size is not None
    from tpi_mpi.kernels import native
    from tpi_mpi.models.linear import linear as run_linear

    g = fmt.group_size
    sz = (torch.rand(K_IN // g, N_OUT, 2) / 15).to(torch.bfloat16)
    if native.load() is not None:  # the rows layout an int4 split takes here, run by the AVX2 kernel
        rows = torch.randint(0, 256, (N_OUT, K_IN // 32, 16), dtype=torch.uint8)
        copy = {"w.qweight": rows, "w.scales_zeros": sz.transpose(0, 1).contiguous()}

        def int4_rows(x: Any, m: Any) -> Any:
            return run_linear(x, m, "w")

        return int4_rows, [copy] + [{k: v.clone() for k, v in copy.items()} for _ in range(copies - 1)], torch.float32
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (N_OUT, K_IN), dtype=torch.int32), 1)

    def int4(x: Any, m: Any) -> Any:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, m[0], g, m[1])

    return int4, [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(copies - 1)], torch.bfloat16


def measure_format(key: str, threads: int, repeats: int = 7) -> dict[str, float]:
    """With `threads` torch threads: bytes/s of format `key` through its kernel on one token (decode) and
    FLOP/s on PROMPT tokens (prefill), over enough distinct matrices to leave the cache."""
    import torch

    torch.set_num_threads(threads)
    fmt = weight_format(key)
    nbytes = fmt.matrix_bytes(N_OUT, K_IN)
    copies = max(2, -(-MIN_BYTES // int(nbytes)))
    product, ws, dtype = format_kernel(fmt, copies)
    ws = [on_huge_pages(w) for w in ws]  # where the ranks hold their weights (tensorfile.weight_buffer)
    one, prompt = torch.randn(1, K_IN).to(dtype), torch.randn(PROMPT, K_IN).to(dtype)

    def run(x: Any) -> Callable[[], None]:
        def all_copies() -> None:
            with torch.inference_mode():
                for m in ws:
                    product(x, m)
        return all_copies

    decode = median_time(run(one), repeats)
    prefill = median_time(run(prompt), max(3, repeats // 2))
    return {"weight_bw": copies * nbytes / decode, "flops": copies * 2 * PROMPT * N_OUT * K_IN / prefill,
            "bytes_per_weight": nbytes / (N_OUT * K_IN), "matrices": copies}


def on_huge_pages(w: Any) -> Any:
    """A copy of w (a tensor, or a dict or tuple of them) in weight buffers, on huge pages where the kernel allows."""
    if isinstance(w, dict):
        return {k: on_huge_pages(v) for k, v in w.items()}
    if isinstance(w, tuple | list):
        return type(w)(on_huge_pages(v) for v in w)
    from tpi_mpi.weights.tensorfile import weight_buffer

    return weight_buffer(w.nbytes).view(w.dtype).view(w.shape).copy_(w)


def measure_read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a sum over a float32 tensor of `nbytes` on huge pages, as the weights (the memory read bound of
    the products)."""
    import torch

    torch.set_num_threads(threads)
    x = on_huge_pages(torch.ones(nbytes // 4))
    t = median_time(lambda: x.sum(), repeats)
    return nbytes / t


def measure_formats(threads: int, keys: tuple[str, ...] = FORMAT_KEYS) -> dict[str, Any]:
    """Every format's kernel speed and the read bandwidth, side by side in one run, with `threads` threads."""
    out: dict[str, Any] = {"threads": threads, "read_bw": measure_read_bandwidth(threads), "formats": {}}
    for key in keys:
        out["formats"][key] = measure_format(key, threads)
    return out


def bound_fractions(measured: dict[str, Any]) -> dict[str, float]:
    """Each format's decode speed as a fraction of the measured read bandwidth (at most 1: a kernel reading
    faster than the bound read part of its weights from cache)."""
    return {k: min(1.0, v["weight_bw"] / measured["read_bw"]) for k, v in measured["formats"].items()}
