"""Quantized splits (weights/quant.py): the round trip within half a step, the packed kernels against the
dequantized weights, tensor parallelism against transformers on the same quantized weights, streaming, errors.

Reference and tolerance: transformers runs, in fp32, the checkpoint weights/export.py puts together from the
split's dequantized slices, so both sides use the same quantized values; what differs is that the packed kernels
take bf16 activations and give bf16 outputs (8 significant bits: a relative rounding of up to 2^-9 at the input
and at the output of every matmul). Over the 3 layers of these models that is about 1 % of the logits' scale
(0.5-0.8 % measured), so prompt logits must agree within 2 % of the largest reference logit. Greedy tokens must
be equal wherever the reference's top-two margin exceeds twice that tolerance: random tiny models have near ties
that bf16 rounding may flip, the trained model has none (tests/test_quality.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SCRIPTS, mpirun, run_tpi
from transformers import AutoModelForCausalLM

from tpi_mpi.errors import UserError
from tpi_mpi.kernels import native
from tpi_mpi.make_model import make_model
from tpi_mpi.models.linear import kernel_name, linear, linears, select_kernel
from tpi_mpi.weights import quant
from tpi_mpi.weights.export import dequantized_checkpoint
from tpi_mpi.weights.shards import open_rank_shard
from tpi_mpi.weights.split import split
from tpi_mpi.weights.tensorfile import parse_header

PROMPT = [1, 37, 250, 11, 400, 99, 3, 77, 120, 301, 45, 8]
NEW_TOKENS = 16
LOGIT_TOL = 0.02  # of the largest reference logit: bf16 activations in the kernels (module docstring)


# --- the round trip and the kernels, in process ----------------------------------------------------------------

def weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Rows of very different ranges and offsets (a group far from zero stresses the bf16 zero), a constant row,
    a zero row and an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-3, 1, n)[:, None] + torch.randn(n, 1, generator=g) * 3
    w[0] = 0.25
    if n > 2:
        w[1] = 0.0
        w[2, k // 2] = 80.0
    return w


SHAPES = [(1, 16), (7, 48), (33, 112), (128, 256)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_round_trip_within_half_a_step(n: int, k: int) -> None:
    w = weights(n, k, seed=n)
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (n,)
    err = (quant.dequantize_int8(q, s) - w).abs()
    assert (err <= s.float()[:, None] / 2 * (1 + 1e-6)).all()
    if n > 2:
        assert (err[1] == 0).all()  # a zero row comes back exactly


INT4_SHAPES = [(16, 32, 32), (48, 96, 32), (80, 192, 64), (112, 256, 128), (64, 384, 128)]


@pytest.mark.parametrize("n,k,g", INT4_SHAPES)
def test_int4_round_trip_within_half_a_step(n: int, k: int, g: int) -> None:
    w = weights(n, k, seed=k)
    q, sz = quant.quantize_int4(w, g)
    assert q.shape == (n, k) and int(q.max()) <= 15 and sz.shape == (k // g, n, 2)
    step = sz[..., 0].float().t().repeat_interleave(g, dim=1)
    assert ((quant.dequantize_int4(q, sz) - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(quant.unpack_int4(quant.pack_int4(q)), q)  # the packing is lossless


@pytest.fixture
def torch_kernels() -> Iterator[None]:
    select_kernel("torch")
    yield
    select_kernel("auto")


@pytest.mark.parametrize("fmt", ["int8", "int4-32", "int4-128"])
@pytest.mark.parametrize("m", [1, 5])
def test_torch_packed_kernel_equals_the_dequantized_weights(torch_kernels: None, fmt: str, m: int) -> None:
    """torch's kernel computes x @ dequantized^T on x rounded to bf16, to bf16 output rounding (2^-8 relative)."""
    spec = quant.QuantSpec("int4", int(fmt.split("-")[1]), "torch") if fmt != "int8" else quant.QuantSpec("int8")
    n, k = 96, 256
    t = quant.quantize_weight("w", weights(n, k, seed=3), spec)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    ref = x.bfloat16().float() @ quant.dequantize_weight(t, "w").t()
    got = linear(x, t, "w")
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got - ref).abs() <= ref.abs() * 2**-8 + 1e-3 * ref.abs().max()).all()


def q8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] as kernels/q8_avx2.c quantizes it: int8 values and fp32 scales per block of 32 (blocks [M, B, 32],
    zero-padded), rounded to nearest even as lrintf does, from x * (127 / amax) in fp32 as the C code computes."""
    m, k = x.shape
    blocks = -(-k // 32)
    xb = F.pad(x.float(), (0, blocks * 32 - k)).reshape(m, blocks, 32)
    amax = xb.abs().amax(dim=2, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(xb * inv), amax / 127


def native_kernel_here() -> bool:
    """Whether this machine should run the AVX2 kernel; on one that should, a failed build fails the tests."""
    if not ({"avx2", "fma", "f16c"} <= native.cpu_flags()):
        pytest.skip("this CPU has no AVX2/FMA/F16C: model.kernel=auto uses torch's kernels (tested above)")
    assert native.load() is not None, native.unavailable_reason()
    return True


NATIVE_CASES = [("int8", 96, 256, 1), ("int8", 33, 112, 1), ("int8", 1104, 4096, 1), ("int8", 1104, 400, 5),
                ("int8", 40, 16, 3), ("int8", 33, 112, 6), ("int8", 50, 160, 17), ("int4-32", 96, 256, 1),
                ("int4-32", 48, 96, 3), ("int4-64", 1104, 4096, 1),
                ("int4-64", 48, 192, 1), ("int4-64", 32, 320, 6), ("int4-128", 1104, 384, 5), ("int4-128", 16, 128, 1)]
# The instruction sets of our int8 / int4 products this CPU can run (kernels/native.py's isa()): AVX2 on every
# machine the kernels build on, and AVX-512 VNNI (kernels/q8_avx512.c) where the CPU has it.
ISAS = ["avx2"] + (["avx512-vnni"] if native.AVX512_FLAGS <= native.cpu_flags() else [])


def spec_of(fmt: str) -> quant.QuantSpec:
    return quant.QuantSpec("int4", int(fmt.split("-")[1])) if fmt != "int8" else quant.QuantSpec("int8")


def term_magnitudes(t: dict[str, torch.Tensor], k: int) -> torch.Tensor:
    """fp64 [N, K]: how large each weight's terms in the kernel's sums can be (int8: |w|; int4: the q * scale and
    the zero - 8 scale parts), the scale of its fp32 rounding."""
    if "w.scales" in t:
        return quant.dequantize_weight(t, "w").double().abs()
    sz = t["w.scales_zeros"].double()
    if t["w.qweight"].dim() == 2:  # torch's layout: [K/G, N, 2]
        sz = sz.transpose(0, 1)
    s, z = sz[..., 0], sz[..., 1]
    return (23 * s + z.abs()).repeat_interleave(k // sz.shape[1], dim=1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,n,k,m", NATIVE_CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-m{c[3]}" for c in NATIVE_CASES])
def test_native_kernel_is_exact_on_quantized_activations(fmt: str, n: int, k: int, m: int, isa: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Our kernels (AVX2, and AVX-512 VNNI where the CPU has it): integer dot products of the int8 / int4 weights
    with the int8 activations of each block of 32, scaled in fp32. Against x_q @ dequantized^T in fp64 (x_q: the
    activations as the kernel quantized them) they may differ by fp32 rounding only: 1e-5 of the sum of the terms'
    magnitudes. K % 32 == 16 (int8's last half block), K % 64 of 16, 32, 48 (VNNI's masked last chunk of 64 int8
    bytes) and int4 rows that end in a part of a 128-column chunk (K = 96, 192, 320), a zero activation row,
    several rows (prefill tiles of 4 x 4 with 1-3 weight or activation rows left over: n = 33, 50, m = 6, 17), and
    output rows split over 2 threads (n >= 1024) included."""
    native_kernel_here()
    monkeypatch.setenv(native.ISA_ENV, isa)
    assert native.isa() == isa
    t = quant.quantize_weight("w", weights(n, k, seed=k), spec_of(fmt))
    assert t["w.qweight"].dim() == (3 if fmt != "int8" else 2)  # int4 in the rows layout
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * torch.logspace(-2, 1, k)
    x[-1] = 0.0 if m > 1 else x[-1]
    xq, xs = q8_activations(x)
    x_q = (xq.double() * xs.double()).reshape(m, -1)[:, :k]
    ref = x_q @ quant.dequantize_weight(t, "w").double().t()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = linear(x, t, "w")
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - ref).abs() <= 1e-5 * (x_q.abs() @ term_magnitudes(t, k).t()) + 1e-30).all()
    if m > 1:
        assert (got[-1] == 0).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4-64"])
def test_native_kernel_within_the_activation_rounding_bound(fmt: str, isa: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Against x @ dequantized^T (exact fp32 activations), the kernel's only error is the rounding of each
    activation to its block's step: |error| <= sum over blocks b of (amax_b / 254) * sum_{i in b} |w_i|."""
    native_kernel_here()
    monkeypatch.setenv(native.ISA_ENV, isa)
    n, k = 64, 320 if fmt == "int8" else 384
    t = quant.quantize_weight("w", weights(n, k, seed=5), spec_of(fmt))
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(9)) * 3
    w = quant.dequantize_weight(t, "w").double()
    ref = x.double() @ w.t()
    _, xs = q8_activations(x)
    half_step = (xs[..., 0].double() / 2).repeat_interleave(32, dim=1)[:, :k]
    bound = half_step @ w.abs().t()
    err = (linear(x, t, "w").double() - ref).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-5 * (x.double().abs() @ term_magnitudes(t, k).t())).all()
    assert err.max() > 0  # the activations were rounded: the test can tell the kernels apart


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,m", [("int8", 1), ("int8", 3), ("int4-64", 1), ("int4-32", 5)])
def test_one_call_for_several_matrices_equals_one_call_each(fmt: str, m: int, isa: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """linears() runs q/k/v (or gate/up) in one kernel call: the same activations' quantization and the same sums
    per output row, so the same bits as linear() on each, with a bias on one of them (Qwen2's q/k/v); output rows
    over 2 threads, the matrices of unequal heights (GQA's k/v)."""
    native_kernel_here()
    monkeypatch.setenv(native.ISA_ENV, isa)
    k = 256
    t: dict[str, torch.Tensor] = {}
    for i, (name, n) in enumerate([("q", 1104), ("k", 48), ("v", 48)]):
        t.update(quant.quantize_weight(name, weights(n, k, seed=i), spec_of(fmt)))
    t["k.bias"] = torch.randn(48)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        together = linears(x, t, ("q", "k", "v"))
        alone = [linear(x, t, n) for n in ("q", "k", "v")]
    finally:
        torch.set_num_threads(threads)
    assert [y.shape for y in together] == [(m, 1104), (m, 48), (m, 48)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))


def test_one_fp16_call_for_several_matrices_equals_one_call_each() -> None:
    """fp16 decoding: linears() runs q/k/v in one kernels/f16_avx2.c call, with the same bits as linear() on each
    (the bias added to the fp32 sums before the one rounding to fp16, as float_linear does); unequal heights over 2
    threads."""
    native_kernel_here()
    g = torch.Generator().manual_seed(5)
    t = {f"{name}.weight": (torch.randn(n, 320, generator=g) * 0.05).half()
         for name, n in [("q", 1104), ("k", 48), ("v", 48)]}
    t["k.bias"] = torch.randn(48, generator=g).half()
    x = torch.randn(1, 320, generator=g).half()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            together = linears(x, t, ("q", "k", "v"))
            alone = [linear(x, t, n) for n in ("q", "k", "v")]
    finally:
        torch.set_num_threads(threads)
    assert [(y.shape, y.dtype) for y in together] == [((1, n), torch.float16) for n in (1104, 48, 48)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))
    ref = [F.linear(x.float(), t[f"{n}.weight"].float(), t.get(f"{n}.bias", torch.zeros(1)).float()).half()
           for n in ("q", "k", "v")]
    for a, b in zip(together, ref, strict=True):
        assert (a.float() - b.float()).abs().max() <= 2e-3 * b.float().abs().max()


@pytest.mark.parametrize("n,k", [(2304, 4096), (40, 37), (33, 72), (1105, 200), (3, 15)])
def test_native_fp32_decoding_kernel_is_the_product_to_fp32_rounding(n: int, k: int) -> None:
    """kernels/f32_avx2.c: one row times fp32 weights, 4 rows at a time and the rest one by one (n = 33, 1105, 3),
    16 columns a step with tails of 8 and of single columns (k = 37, 72, 15). Against fp64 within fp32 rounding of
    its terms; linear() runs it (with the bias added to its sums) and linears() runs q/k/v in one call with the same
    bits as one call each."""
    native_kernel_here()
    g = torch.Generator().manual_seed(n + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g), torch.randn(n, generator=g)
    ref = x.double() @ w.double().t()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = native.fp32_matvecs(x, [w])[0]
            with_bias = linear(x, {"w.weight": w, "w.bias": b}, "w")
            kn = max(1, n // 3)
            t = {"q.weight": w, "k.weight": w[:kn].clone(), "v.weight": w[-1:].clone(), "k.bias": b[:kn]}
            together = linears(x, t, ("q", "k", "v"))
            alone = [linear(x, t, name) for name in ("q", "k", "v")]
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == torch.float32 and got.shape == (1, n)
    assert ((got.double() - ref).abs() <= 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-30).all()
    assert torch.equal(with_bias, got + b)  # linear() took the kernel
    assert all(torch.equal(a, c) for a, c in zip(together, alone, strict=True))


@pytest.mark.parametrize("m,n,k", [(2, 64, 4096), (5, 37, 100), (13, 130, 48), (16, 16, 16), (7, 3, 33)])
def test_fp32_prefill_kernel_is_the_product_to_fp32_rounding(m: int, n: int, k: int) -> None:
    """fp32 prefill of 2..16 rows: kernels/prefill_avx512.c where the CPU has AVX-512, else prefill_avx2.c (float_linear
    takes either); the fp64 product within fp32 rounding of its terms (k * 2^-24 of sum |w x|, and a margin), for row
    counts that are not multiples of the kernels' groups of rows, N of their blocks and K of their lanes."""
    native_kernel_here()
    g = torch.Generator().manual_seed(m * n + k)
    w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    with torch.inference_mode():
        got = linear(x, {"w.weight": w, "w.bias": b}, "w")
    want = x.double() @ w.double().t() + b.double()
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().t()) + 1e-6
    assert got.shape == (m, n) and ((got.double() - want).abs() <= bound).all()
    assert torch.equal(got, native.fp32_matmul(x, w) + b)  # and it was our kernel that ran


@pytest.mark.parametrize("m", [17, 20, 37])
def test_fp32_prefill_kernel_takes_more_rows_in_turns(m: int) -> None:
    """fp32_matmul itself takes any number of rows, in turns (18 a turn in prefill_avx512.c, 16 in prefill_avx2.c;
    linear() gives it 2..16): the same bound."""
    native_kernel_here()
    g = torch.Generator().manual_seed(m)
    w, x = torch.randn(40, 1100, generator=g), torch.randn(m, 1100, generator=g)
    got = native.fp32_matmul(x, w)
    want = x.double() @ w.double().t()
    assert ((got.double() - want).abs() <= 2 * 1100 * 2.0**-24 * (x.double().abs() @ w.double().abs().t())).all()


@pytest.mark.parametrize("path", ["torch-fp16", "kernel", "fp32-chunks"])
def test_fp16_prefill_either_way_is_the_fp32_product_rounded(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Several rows of fp16 activations: torch's fp16 matmul where the CPU has AVX-512-FP16 (the default there), else
    prefill_avx512.c or prefill_avx2.c for 2..64 rows, else fp32 products on converted chunks of rows (more rows, or
    no kernels); each is the fp32 product of the same values with its bias, rounded once to fp16 (within 2 fp16
    ulps: the sums' order differs), over more rows than one chunk holds."""
    from tpi_mpi.models import linear as lin

    assert lin.FP16_MATMUL_IN_HARDWARE == ("avx512_fp16" in native.cpu_flags())
    monkeypatch.setattr(lin, "FP16_MATMUL_IN_HARDWARE", path == "torch-fp16")
    monkeypatch.setattr(lin, "FP16_CHUNK_BYTES", 64 * 96 * 4)  # 64 rows a chunk: 3 chunks and a part
    g = torch.Generator().manual_seed(9)
    w, b = (torch.randn(200, 96, generator=g) * 0.1).half(), torch.randn(200, generator=g).half()
    x = torch.randn(70 if path == "fp32-chunks" else 5, 96, generator=g).half()  # 70 rows: beyond the kernel's
    with torch.inference_mode():
        got = lin.float_linear(x, w, b)
    want = F.linear(x.float(), w.float(), b.float())
    assert got.dtype == torch.float16 and got.shape == (x.shape[0], 200)
    assert ((got.float() - want).abs() <= 2 * 2.0**-10 * want.abs().clamp(min=2.0**-14)).all()
    if path == "kernel" and lin.native_kernels():
        assert torch.equal(got, (native.fp16_matmul(x, w) + b.float()).half())  # and it was our kernel that ran


# The float prefill kernels this CPU runs: prefill_avx2.c everywhere the kernels build, prefill_avx512.c where the
# CPU has AVX-512 (native.prefill_avx512()).
PREFILL_KERNELS = ["avx2"] + (["avx512"] if native.prefill_avx512() else [])


@pytest.mark.skipif(native.load() is None, reason="the AVX2 kernels cannot be built here")
@pytest.mark.parametrize("kernel", PREFILL_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k", [(2, 16, 96), (5, 40, 1100), (16, 33, 300), (3, 38, 1100), (17, 48, 264),
                                   (37, 31, 1031)])
def test_prefill_kernels_are_the_fp64_product_within_fp32_rounding(m: int, n: int, k: int, dtype: torch.dtype,
                                                                   kernel: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """prefill_avx2.c and prefill_avx512.c on any shape, fp16 and fp32 weights (TPI_MPI_KERNEL_ISA=avx2 holds fp16 to
    the first): rows beyond a chunk of 24 and a last chunk that ends in 1 or 2 rows of a tile of 3 (n = 40, 31; 38),
    columns beyond whole tiles and a last k % 8 or % 16 (1100, 300, 1031), activation rows 16 or 18 at a time
    (17, 37) and groups of 4 or 6 with rows left: each sum within fp32 rounding of the exact one of the same
    weights."""
    monkeypatch.setenv(native.ISA_ENV, "avx2" if kernel == "avx2" else "auto")
    g = torch.Generator().manual_seed(m * n)
    w, x = torch.randn(n, k, generator=g).to(dtype), torch.randn(m, k, generator=g)
    if dtype == torch.float16:
        assert native.fp16_prefill_kernel() == kernel
        got = native.fp16_matmul(x, w)
    else:
        got = native.fp32_matmul_avx2(x, w) if kernel == "avx2" else native.fp32_matmul(x, w)
    want = x.double() @ w.double().t()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - want).abs() <= 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().t())).all()


@pytest.mark.skipif("avx512-vnni" not in ISAS, reason="q8_avx512.c needs AVX-512 VNNI")
def test_int4_decoding_loads_in_halves_on_amd_cpus_with_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """q8_avx512.c's int4 decoding loads its weights as two 256-bit halves on AMD CPUs (native.split_int4_loads, set
    once when the library loads) and as one 512-bit load elsewhere: the same bytes into the same register, so the
    same bits either way (G = 64 and 128, output rows split over 2 threads)."""
    monkeypatch.setenv(native.ISA_ENV, "avx512-vnni")
    lib = native.load()
    assert native.split_int4_loads() == (native.cpu_vendor() == "AuthenticAMD")
    outs = {}
    try:
        for split in (0, 1):
            lib.q8v_set_split_loads(split)
            for g in (64, 128):
                t = quant.quantize_weight("w", weights(2048, 384, seed=g), quant.QuantSpec("int4", g))
                x = torch.randn(1, 384, generator=torch.Generator().manual_seed(g))
                outs[(split, g)] = native.int4_matmul(x, t["w.qweight"], t["w.scales_zeros"])
    finally:
        lib.q8v_set_split_loads(int(native.split_int4_loads()))
    assert all(torch.equal(outs[(0, g)], outs[(1, g)]) for g in (64, 128))
    assert not torch.equal(outs[(0, 64)], torch.zeros_like(outs[(0, 64)]))


def test_kernel_isa_is_chosen_by_the_cpu_and_can_be_held_to_avx2(monkeypatch: pytest.MonkeyPatch) -> None:
    """isa() is AVX-512 VNNI exactly where the CPU has it; TPI_MPI_KERNEL_ISA=avx2 holds it to AVX2 (the run record
    names the one that ran); any other value, or avx512-vnni on a CPU without it, is one error naming the choices."""
    has = native.AVX512_FLAGS <= native.cpu_flags()
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    assert native.isa() == ("avx512-vnni" if has else "avx2")
    monkeypatch.setenv(native.ISA_ENV, "avx2")
    assert native.isa() == "avx2"
    monkeypatch.setenv(native.ISA_ENV, "sse2")
    with pytest.raises(UserError, match="not one of auto, avx2, avx512-vnni"):
        native.isa()
    monkeypatch.setenv(native.ISA_ENV, "avx512-vnni")
    if has:
        assert native.isa() == "avx512-vnni"
    else:
        with pytest.raises(UserError, match="this CPU lacks"):
            native.isa()


@pytest.mark.parametrize("dtype,m", [(torch.float32, 1), (torch.float32, 7), (torch.float16, 7), (torch.float16, 1)])
def test_float_paths_equal_torch_linear(dtype: torch.dtype, m: int) -> None:
    """fp32 one row split over 2 threads by rows, fp32 prefill on oneDNN, fp16 prefill in fp32 chunks: each equals
    the product in fp32 to its dtype's rounding."""
    g = torch.Generator().manual_seed(2)
    w, x, b = torch.randn(2304, 320, generator=g), torch.randn(m, 320, generator=g), torch.randn(2304, generator=g)
    ref = F.linear(x.to(dtype).float(), w.to(dtype).float(), b.to(dtype).float())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the row split needs more than one thread
    try:
        with torch.inference_mode():
            got = linear(x.to(dtype), {"w.weight": w.to(dtype), "w.bias": b.to(dtype)}, "w")
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == dtype and got.shape == (m, 2304)
    eps = 2**-10 if dtype == torch.float16 else 1e-6
    assert ((got.float() - ref).abs() <= eps * ref.abs().max()).all()


FP16_DECODERS = ["f16-avx2"] + (["f16-avx512"] if "avx512f" in native.cpu_flags() else [])


@pytest.mark.parametrize("kernel", FP16_DECODERS)
@pytest.mark.parametrize("n,k", [(2304, 4096), (40, 37), (33, 72), (1104, 200)])
def test_native_fp16_decoding_kernel_is_exact_in_fp32(n: int, k: int, kernel: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels/f16_avx2.c, and f16_avx512.c where the CPU has AVX-512F (TPI_MPI_KERNEL_ISA=avx2 holds it to the
    first): one row times fp16 weights, summed in fp32. Against the same fp16 values in fp64 it may differ by fp32
    rounding only (1e-6 of the sum of |terms|; K = 37 and 72 take the tails of 8 or 16 and of 1, 2304 rows split
    over 2 threads); the bias is added before the one rounding to fp16. With model.kernel=torch the same call is
    torch's F.linear, and the run record's weights.kernel names each."""
    native_kernel_here()
    monkeypatch.setenv(native.ISA_ENV, "avx2" if kernel == "f16-avx2" else "auto")
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(n, k, generator=g) * torch.logspace(-3, 1, k)).half()
    x, b = torch.randn(1, k, generator=g).half(), torch.randn(n, generator=g).half()
    ref = x.double() @ w.double().t()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = native.fp16_matvec(x, w)
            with_bias = linear(x, {"w.weight": w, "w.bias": b}, "w")
    finally:
        torch.set_num_threads(threads)
    assert got.dtype == torch.float32 and got.shape == (1, n)
    assert ((got.double() - ref).abs() <= 1e-6 * (x.double().abs() @ w.double().abs().t()) + 1e-30).all()
    assert with_bias.dtype == torch.float16 and torch.equal(with_bias, (got + b.float()).half())
    assert native.fp16_decode_kernel() == kernel and kernel_name(quant.QuantSpec("none"), torch.float16) == kernel
    select_kernel("torch")
    try:
        with torch.inference_mode():
            assert torch.equal(linear(x, {"w.weight": w}, "w"), F.linear(x, w))
        assert kernel_name(quant.QuantSpec("none"), torch.float16) == "torch"
    finally:
        select_kernel("auto")
    assert kernel_name(quant.QuantSpec("none"), torch.float32) is None


def test_fp16_run_records_the_kernel_model_kernel_chose(models: dict[str, Path], tmp_path: Path) -> None:
    """A fp16 split decodes on our kernel by default (f16-avx2, f16-avx512 where the CPU has AVX-512F) and on
    torch's F.linear with model.kernel=torch (the run record's weights.kernel), with the same greedy tokens on this
    3-layer model."""
    native_kernel_here()
    shards = split(models["llama-gqa"], tmp_path / "fp16", 2, None, dtype="fp16")
    records = {}
    for kind in ("auto", "torch"):
        out = tmp_path / f"{kind}.json"
        proc = mpirun(2, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/hydra-{kind}", f"model.shards={shards}",
                          "prompt_ids=[1,2,3]", "generation.max_new_tokens=4", "output.results=null",
                          f"output.json={out}", f"model.kernel={kind}"], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[kind] = json.loads(out.read_text())
    assert records["auto"]["weights"]["kernel"] == native.fp16_decode_kernel()
    assert records["torch"]["weights"]["kernel"] == "torch"
    assert records["auto"]["token_ids"] == records["torch"]["token_ids"]


def test_kernel_constraints_are_refused_at_split_time() -> None:
    with pytest.raises(UserError, match="int8 kernel needs a multiple of 16"):
        quant.quantize_weight("down_proj", torch.randn(32, 40), quant.QuantSpec("int8"))
    with pytest.raises(UserError, match="group size 64 does not divide down_proj's 96 input columns"):
        quant.quantize_weight("down_proj", torch.randn(32, 96), quant.QuantSpec("int4", 64))
    with pytest.raises(UserError, match="int4 kernel needs a multiple of 16"):
        quant.quantize_weight("q_proj", torch.randn(24, 64), quant.QuantSpec("int4", 32))


# --- tensor parallel against transformers on the same quantized weights ----------------------------------------

MODELS = {
    # FFN 688 = 10.75 groups of 64: an int4 split pads it with dead channels to 704 (exact)
    "llama-gqa": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    # q/k/v biases; qwen2 ties lm_head to the embedding: a quantized split gets a head of its own
    "qwen2-bias": ("qwen2", {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3,
                             "intermediate_size": 512}),
    # biases everywhere, o_proj's and down_proj's added by rank 0 only
    "llama-bias": ("llama", {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3,
                             "intermediate_size": 512, "attention_bias": True, "mlp_bias": True}),
}

# (model, ranks, ratios, format[-group size])
CASES = [
    ("llama-gqa", 1, None, "int8"),
    ("llama-gqa", 2, [0.7, 0.3], "int8"),
    ("qwen2-bias", 3, None, "int8"),
    ("llama-gqa", 1, None, "int4-128"),
    ("llama-gqa", 2, None, "int4-64"),
    ("qwen2-bias", 3, None, "int4-64"),
    ("qwen2-bias", 2, [0.6, 0.4], "int4-32@torch"),  # torch's int4 layout and kernel
    ("llama-bias", 3, None, "int4-64"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qmodels")
    return {name: make_model(root / name, "tiny", arch, layers=3, seed=i, overrides=over)
            for i, (name, (arch, over)) in enumerate(MODELS.items())}


def fmt_args(fmt: str) -> dict:
    """split()'s arguments for FMT or FMT@KERNEL (int4-64@torch: torch's int4 layout)."""
    fmt, _, kernel = fmt.partition("@")
    name, _, g = fmt.partition("-")
    return {"quant_format": name, "group_size": int(g) if g else None, "kernel": kernel or "auto"}


def reference(model_dir: Path) -> tuple[np.ndarray, list[int], list[float]]:
    """transformers in fp32: prompt logits, greedy tokens, and the top-two margin at each greedy step."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    tokens, margins = [], []
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        for _ in range(NEW_TOKENS):
            last = model(ids).logits[0, -1]
            top = last.topk(2).values
            margins.append(float(top[0] - top[1]))
            tokens.append(int(last.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
    return logits, tokens, margins


def assert_matches(got: np.lib.npyio.NpzFile, ref: tuple[np.ndarray, list[int], list[float]]) -> None:
    logits, tokens, margins = ref
    assert got["logits"].shape == logits.shape
    tol = LOGIT_TOL * np.abs(logits).max()
    assert np.abs(got["logits"] - logits).max() < tol
    for step, (a, b, margin) in enumerate(zip(got["tokens"].tolist(), tokens, margins, strict=True)):
        if margin < 2 * tol:
            break  # a near tie: from here on the sequences may part
        assert a == b, f"greedy token {step} differs with a reference margin of {margin:.3g} (tolerance {tol:.3g})"


@pytest.mark.parametrize("name,n,ratios,fmt", CASES,
                         ids=[f"{c[0]}-n{c[1]}{'-uneven' if c[2] else ''}-{c[3]}" for c in CASES])
def test_quantized_tp_matches_hf_on_the_same_weights(models: dict[str, Path], tmp_path: Path, name: str, n: int,
                                                     ratios: list[float] | None, fmt: str) -> None:
    shards = split(models[name], tmp_path / "shards", n, ratios, **fmt_args(fmt))
    manifest = json.loads((shards / "rank_0" / "manifest.json").read_text())
    assert manifest["quant"]["format"] == fmt_args(fmt)["quant_format"]
    out = tmp_path / "tp.npz"
    proc = mpirun(n, [str(SCRIPTS / "tp_forward.py"), str(shards), str(out), str(NEW_TOKENS), *map(str, PROMPT)],
                  timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches(np.load(out), reference(dequantized_checkpoint(shards, tmp_path / "ref")))


def test_quantized_head_on_the_master(models: dict[str, Path], tmp_path: Path) -> None:
    """memory.head=master: rank 0's whole lm_head, quantized (tied in the checkpoint), gives the same logits."""
    shards = split(models["qwen2-bias"], tmp_path / "shards", 2, None, **fmt_args("int4-64"))
    out = tmp_path / "tp.npz"
    proc = mpirun(2, [str(SCRIPTS / "tp_forward.py"), "--head=master", str(shards), str(out), str(NEW_TOKENS),
                      *map(str, PROMPT)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches(np.load(out), reference(dequantized_checkpoint(shards, tmp_path / "ref")))


# --- what a split holds ------------------------------------------------------------------------------------------

def test_packed_blocks_are_smaller_by_their_bytes_per_weight(models: dict[str, Path], tmp_path: Path) -> None:
    sizes = {}
    for fmt in ("none", "int8", "int4-64"):
        shards = split(models["qwen2-bias"], tmp_path / fmt, 1, None, **fmt_args(fmt))
        sizes[fmt] = sum(p.stat().st_size for p in (shards / "rank_0").glob("layer_*.safetensors"))
    assert 0.24 < sizes["int8"] / sizes["none"] < 0.27  # 1 byte of 4, plus scales and the float norms and biases
    assert 0.13 < sizes["int4-64"] / sizes["none"] < 0.16  # 0.5 + 4/64 bytes of 4


def test_int4_layout_and_model_kernel_must_agree() -> None:
    """The rows layout is read by the AVX2 kernel only, torch's by torch's: the other choice is one line."""
    with pytest.raises(UserError, match="model.kernel=torch cannot run this split: its int4 weights are in the AVX2"):
        select_kernel("torch", quant.QuantSpec("int4", 64, "rows"))
    with pytest.raises(UserError, match="model.kernel=native cannot run this split: its int4 weights are in torch's"):
        select_kernel("native", quant.QuantSpec("int4", 64, "torch"))
    select_kernel("auto")


def test_int4_split_from_another_kernel_layout_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    shards = split(models["qwen2-bias"], tmp_path / "s", 1, None, **fmt_args("int4-64@torch"))
    path = shards / "rank_0" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["quant"]["int4_layout"] = "0" * 16  # as if packed where torch packs int4 in other blocks
    path.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="packed for another CPU's kernel layout"):
        open_rank_shard(shards, 0, 1)


# --- streaming and partial residency ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stream_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("qmem") / "m", "tiny", "llama", layers=4, seed=5,
                      overrides={"hidden_size": 512, "intermediate_size": 3072})


@pytest.mark.parametrize("fmt", ["int8", "int4-64"])
def test_streamed_and_partly_resident_quantized_runs_give_the_resident_tokens(stream_model: Path, tmp_path: Path,
                                                                            fmt: str) -> None:
    shards = split(stream_model, tmp_path / "shards", 2, None, **fmt_args(fmt))
    specs = ["resident", "stream:1", "stream:2", "partial:2:3", "stream:2@master"]
    out = tmp_path / "mem.npz"
    # lm_head read in chunks of a few whole int4 layout blocks
    proc = mpirun(2, [str(SCRIPTS / "mem_forward.py"), "--head-chunk=65536", str(shards), str(out), "8",
                      ",".join(specs), *map(str, PROMPT)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    blocks = [[parse_header(p).data_bytes for p in (shards / f"rank_{r}").glob("layer_*")] for r in range(2)]
    for i, spec in enumerate(specs):
        assert got[f"tokens_{i}"].tolist() == got["tokens_0"].tolist(), spec
        if spec.startswith("stream"):  # every pass read the packed blocks again, and no more than them
            for r in range(2):
                blocks_read = got[f"bytes_read_{i}"][r] - got[f"head_bytes_read_{i}"][r]
                # the reader may have gone `window` blocks ahead; the norms and embedding rows are small
                ahead = got[f"window_{i}"][r] * max(blocks[r]) + 2**20
                assert 8 * sum(blocks[r]) <= blocks_read <= 8 * sum(blocks[r]) + ahead, spec
    head_bytes = [sum(e.nbytes for k, e in open_rank_shard(shards, r, 2).master_tensor_file(
        "head_slice.safetensors").entries.items() if k.startswith("lm_head.")) for r in range(2)]
    assert got["head_bytes_read_2"].tolist() == [8 * b for b in head_bytes]  # the packed head, every pass


# --- bad input -----------------------------------------------------------------------------------------------------

def test_quantized_split_with_a_model_dtype_it_cannot_honour(models: dict[str, Path], tmp_path: Path) -> None:
    shards = split(models["llama-gqa"], tmp_path / "shards", 2, None, **fmt_args("int4-64"))
    proc = run_tpi(2, [f"model.shards={shards}", "prompt_ids=[1,2,3]", "model.dtype=fp16", "output.results=null"],
                   tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1 and "model.dtype=fp16 cannot be honoured by this int4-g64 split" in errors[0], \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_kernels_where_they_cannot_be_built(models: dict[str, Path], tmp_path: Path) -> None:
    """No C compiler (CC names none, an empty kernel cache): model.kernel=auto runs torch's int8 kernel and the run
    record says so; model.kernel=native, and an int4 split in the AVX2 kernel's rows layout, are one line each
    saying why not, and no traceback; a split made there with --kernel auto takes torch's int4 layout."""
    env = {"CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def run(shards: Path, *extra: str) -> subprocess.CompletedProcess:
        return mpirun(2, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/hydra", f"model.shards={shards}",
                          "prompt_ids=[1,2,3]", "generation.max_new_tokens=2", "output.results=null", *extra],
                      timeout=120, env=env)

    def one_line(proc: subprocess.CompletedProcess, message: str) -> None:
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr

    int8 = split(models["llama-gqa"], tmp_path / "int8", 2, None, **fmt_args("int8"))
    out = tmp_path / "run.json"
    proc = run(int8, f"output.json={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["weights"]["kernel"] == "torch"
    one_line(run(int8, "model.kernel=native"), "model.kernel=native: the AVX2 kernel cannot be used here: no C "
             "compiler to build it")
    native_kernel_here()  # the int4 split below is made in this process, where the kernel builds
    rows = split(models["llama-gqa"], tmp_path / "int4", 2, None, **fmt_args("int4-64"))
    one_line(run(rows), "this split's int4 weights are in the AVX2 kernel's rows layout, and that kernel cannot be "
             "used here: no C compiler")
    proc = subprocess.run([sys.executable, "-m", "tpi_mpi.split", "--model", str(models["llama-gqa"]), "--out",
                           str(tmp_path / "int4-there"), "--world-size", "2", "--quant", "int4"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "int4-there" / "rank_0" / "manifest.json").read_text())
    assert manifest["quant"]["int4_layout"] == quant.layout_fingerprint()  # torch's layout
    assert not (tmp_path / "cache" / "tpi_mpi" / "kernels").exists() or \
        not any((tmp_path / "cache" / "tpi_mpi" / "kernels").iterdir())  # no half-built library left
