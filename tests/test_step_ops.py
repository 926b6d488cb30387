"""The small ops of a decoding step in C (kernels/step_ops.c) against the torch code they replace (models/llama.py).

RoPE and the KV cache writes are the same arithmetic in the same order (in fp16 rounded after each op, as torch's
fp16 ops), so the caches must be equal bit for bit. RMSNorm and attention sum in another order: they must agree to
the rounding of the dtype, of the values' scale: fp32 1e-5 (a sum of a few thousand fp32 terms rounds at about 1e-7
relative each), fp16 4e-3 (the outputs are rounded to fp16, 2^-11 relative, once after sums that differ at fp32
rounding, and a value near a rounding boundary can land one ulp away). A wrong index or a missed key is off by
orders more. The end-to-end check is tests/test_tp_vs_hf.py, whose fp32 decoding takes this path.
"""

from __future__ import annotations

import pytest
import torch
from test_quant import native_kernel_here

from tpi_mpi.models import llama
from tpi_mpi.models.decoder_config import apply_rope
from tpi_mpi.models.llama import ShardedLayer, Span, norm, rms_norm


@pytest.fixture(autouse=True)
def _native() -> None:
    native_kernel_here()


TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
DTYPES = pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "fp16"])


@DTYPES
@pytest.mark.parametrize("m,k", [(1, 4096), (3, 100), (1, 7), (2, 64)])
def test_norm_equals_rms_norm(m: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(k)
    x, w = (torch.randn(m, k, generator=g) * 3).to(dtype), torch.randn(k, generator=g).to(dtype)
    with torch.inference_mode():
        got = norm(x, w, 1e-5)
    want = rms_norm(x, w, 1e-5)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got.float() - want.float()).abs().max() <= TOL[dtype] * want.float().abs().max()


def test_norm_keeps_torch_for_other_dtypes_and_autograd() -> None:
    x, w = torch.randn(1, 64), torch.randn(64)
    assert torch.equal(norm(x, w, 1e-6), rms_norm(x, w, 1e-6))  # grad mode: torch's
    with torch.inference_mode():
        xb, wb = x.bfloat16(), w.bfloat16()
        assert torch.equal(norm(xb, wb, 1e-6), rms_norm(xb, wb, 1e-6))


def layer_pair(heads: int, kv: int, window: int | None, capacity: int, seed: int,
               dtype: torch.dtype) -> tuple[ShardedLayer, ShardedLayer]:
    """Two layers with the same random caches (one for each path)."""
    a = ShardedLayer(heads, kv, 32, 1e-5, window, dtype, slots=2)
    b = ShardedLayer(heads, kv, 32, 1e-5, window, dtype, slots=2)
    g = torch.Generator().manual_seed(seed)
    for slot in (0, 1):
        a.reset_cache(capacity, slot)
        b.reset_cache(capacity, slot)
        for name in ("k_cache", "v_cache"):
            fill = torch.randn(1, kv, capacity, 32, generator=g)
            getattr(a, name)[slot].copy_(fill)
            getattr(b, name)[slot].copy_(fill)
    return a, b


def torch_path(layer: ShardedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, spans: list[Span]) -> torch.Tensor:
    """What ShardedLayer.attention does without step_ops: apply_rope, then _attend per sequence."""
    n, hd = len(spans), layer.head_dim
    q4 = q.view(1, n, layer.n_heads, hd).transpose(1, 2)
    k4 = k.view(1, n, layer.n_kv, hd).transpose(1, 2)
    v4 = v.view(1, n, layer.n_kv, hd).transpose(1, 2)
    q4, k4 = apply_rope(q4, k4, cos, sin)
    return torch.cat([layer._attend(q4[:, :, i:i + 1], k4[:, :, i:i + 1], v4[:, :, i:i + 1], s)
                      for i, s in enumerate(spans)])


@DTYPES
@pytest.mark.parametrize("heads,kv,window", [(4, 4, None), (8, 2, None), (4, 2, 5)], ids=["mha", "gqa", "window"])
@pytest.mark.parametrize("positions", [[0], [9], [3, 17]], ids=["first", "later", "two-sequences"])
def test_attention_of_one_position_equals_torch(heads: int, kv: int, window: int | None,
                                                positions: list[int], dtype: torch.dtype) -> None:
    a, b = layer_pair(heads, kv, window, 24, heads + len(positions), dtype)
    spans = [Span(slot, pos, 1) for slot, pos in enumerate(positions)]
    g = torch.Generator().manual_seed(sum(positions))
    n = len(spans)
    q, k, v = (torch.randn(n, h * 32, generator=g).to(dtype) for h in (heads, kv, kv))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 32, 2).float() / 32))
    freqs = torch.tensor(positions).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(0).to(dtype), emb.sin().unsqueeze(0).to(dtype)
    with torch.inference_mode():
        want = torch_path(a, q.clone(), k.clone(), v.clone(), cos, sin, spans)
        got = b._attend_ones(q.clone(), k.clone(), v.clone(), cos, sin, spans)
    assert got.shape == want.shape == (n, heads * 32) and got.dtype == want.dtype
    assert (got.float() - want.float()).abs().max() <= TOL[dtype] * want.float().abs().max()
    for slot in range(2):  # the rotated k and the v written at the same places, bit for bit
        assert torch.equal(a.k_cache[slot], b.k_cache[slot])
        assert torch.equal(a.v_cache[slot], b.v_cache[slot])


def test_attention_takes_the_c_path_only_when_decoding_in_fp32_or_fp16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill (several positions) and bf16 layers keep torch's ops: the C path is called for decoding only."""
    calls = []
    monkeypatch.setattr(llama.native, "attention_one", lambda q, *a: calls.append(q.dtype) or torch.zeros_like(q))
    weights = {"input_norm.weight": torch.ones(64), **{f"{n}_proj.weight": torch.randn(64, 64) * 0.1
                                                      for n in ("q", "k", "v", "o")}}
    cos, sin = torch.ones(1, 3, 32), torch.zeros(1, 3, 32)
    with torch.inference_mode():
        for dtype, q_len in ((torch.float32, 3), (torch.bfloat16, 1), (torch.float32, 1), (torch.float16, 1)):
            layer = ShardedLayer(2, 2, 32, 1e-5, None, dtype)
            layer.reset_cache(8)
            out = layer.attention({k: w.to(dtype) for k, w in weights.items()}, torch.randn(q_len, 64).to(dtype),
                                  0 if q_len > 1 else 3, cos[:, :q_len].to(dtype), sin[:, :q_len].to(dtype))
            assert out.shape == (q_len, 64)
    assert calls == [torch.float32, torch.float16]
