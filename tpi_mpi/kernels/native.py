"""The hand-written C kernels: built with the machine's C compiler on first use, loaded with ctypes.

    int8 weights, and int4 in the rows layout, x int8-quantized activations (AVX2)
                                                       q8_avx2.c says why torch's kernels are not enough
    the same on AVX-512 with VNNI, where the CPU has it  q8_avx512.c (same blocks, same int32 sums)
    fp16 weights x one fp32 row (decoding; AVX2 + F16C)  f16_avx2.c likewise
    the same on AVX-512F, where the CPU has it            f16_avx512.c
    fp16 or fp32 weights x a few fp32 rows (prefill where the CPU has no AVX-512)
                                                       prefill_avx2.c likewise
    RMSNorm and the attention of one position, fp32/fp16   step_ops.c (the small ops of a decoding step)
    fp32 weights x one fp32 row (decoding; AVX2 + FMA)     f32_avx2.c likewise
    fp16 or fp32 weights x a few fp32 rows (prefill; AVX-512)  prefill_avx512.c

The shared library (all eight sources) is cached under $XDG_CACHE_HOME/tpi_mpi/kernels (default ~/.cache), named by a
hash of the sources, the flags and the compiler's version, so an edit or another compiler builds anew. Ranks that start
together may build at once: each writes its own temporary file and renames it into place (atomic), so nobody
loads a half-written library. Where it cannot be had (not x86-64 with AVX2, FMA and F16C, no compiler, the build
failed), `load()` returns None and `unavailable_reason()` says why; models/linear.py then uses torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from tpi_mpi.errors import UserError
from tpi_mpi.kernels import rows

SOURCES = [Path(__file__).with_name(n) for n in ("q8_avx2.c", "f16_avx2.c", "f32_avx2.c", "prefill_avx2.c",
                                                   "q8_avx512.c", "step_ops.c", "prefill_avx512.c", "f16_avx512.c")]
HEADERS = [Path(__file__).with_name("avx2_sums.h")]  # included by the AVX2 sources: part of the library's hash
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]  # OpenMP: q8_avx2.c says why
# What q8_avx512.c needs of the CPU (/proc/cpuinfo's names). TPI_MPI_KERNEL_ISA=avx2 keeps the AVX2 products there
# too: the tests compare the two, and a benchmark can show what VNNI is worth.
AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
ISA_ENV = "TPI_MPI_KERNEL_ISA"

_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tpi_mpi" / "kernels"


@functools.cache
def _cpuinfo(field: str) -> str:
    """The value of the first /proc/cpuinfo line that starts with `field` ("" where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.cache  # asked on every product (isa(), fp16_decode_kernel())
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), "" where it cannot be read."""
    return _cpuinfo("vendor_id")


def held_to_avx2() -> bool:
    """Whether TPI_MPI_KERNEL_ISA=avx2 holds our products to their AVX2 versions on a CPU with AVX-512."""
    return os.environ.get(ISA_ENV, "") == "avx2"


def isa() -> str:
    """Which products int8 and int4 run: "avx512-vnni" where the CPU has it (and TPI_MPI_KERNEL_ISA does not say
    avx2), else "avx2"."""
    forced = os.environ.get(ISA_ENV, "")
    if forced not in ("", "auto", "avx2", "avx512-vnni"):
        raise UserError(f"{ISA_ENV}={forced} is not one of auto, avx2, avx512-vnni")
    have = AVX512_FLAGS <= cpu_flags()
    if forced == "avx512-vnni" and not have:
        raise UserError(f"{ISA_ENV}=avx512-vnni, but this CPU lacks {', '.join(sorted(AVX512_FLAGS - cpu_flags()))}")
    return "avx512-vnni" if have and forced != "avx2" else "avx2"


def _build() -> Path:
    """The path of the built library: from the cache, else compiled now. Raises RuntimeError saying why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernel is for x86-64 (AVX2); this machine is {platform.machine()}")
    missing = {"avx2", "fma", "f16c"} - cpu_flags()
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(sorted(missing))}")
    named = os.environ.get("CC")
    cc = shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError(f"no C compiler to build it (CC={named} is not one)" if named else
                           "no C compiler to build it (cc or gcc; or set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = b"".join(s.read_bytes() for s in SOURCES + HEADERS)
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"q8_avx2-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        p = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL | None:
    """The kernels' library, or None where it cannot be had (unavailable_reason() says why). Tried once."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    _tried = True
    try:
        lib = ctypes.CDLL(str(_build()))
    except (RuntimeError, OSError) as e:
        _reason = str(e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    c_int = ctypes.c_int
    for name in ("q8_int8_products", "q8v_int8_products"):  # (count, w, scales, n, k, x, m, y, threads)
        getattr(lib, name).argtypes = [c_int, p, p, p, i64, p, i64, p, c_int]
        getattr(lib, name).restype = c_int
    for name in ("q8_int4_products", "q8v_int4_products"):  # (count, w, scales_zeros, n, group, k, x, m, y, threads)
        getattr(lib, name).argtypes = [c_int, p, p, p, i64, i64, p, i64, p, c_int]
        getattr(lib, name).restype = c_int
    for name in ("f16_matvec_many", "f16v_matvec_many"):  # (count, w, n, k, x, y, threads)
        getattr(lib, name).argtypes = [c_int, p, p, i64, p, p, c_int]
        getattr(lib, name).restype = None
    lib.f32_matvec_many.argtypes = [c_int, p, p, i64, p, p, c_int]  # (count, w, n, k, x, y, threads)
    lib.f32_matvec_many.restype = None
    for name in ("f16_matmul", "f32_matmul_avx2", "f32_matmul", "f16_matmul_avx512"):  # (w, n, k, x, m, y, threads)
        getattr(lib, name).argtypes = [p, i64, i64, p, i64, p, c_int]
        getattr(lib, name).restype = c_int
    lib.q8v_set_split_loads.argtypes = [c_int]
    lib.q8v_set_split_loads.restype = None
    lib.q8v_set_split_loads(int(split_int4_loads()))
    lib.step_rms_norm.argtypes = [p, p, i64, i64, ctypes.c_float, p, c_int]
    lib.step_rms_norm.restype = None
    # (q, k, v, cos, sin, k_cache, v_cache, heads, kv_heads, dim, capacity, pos, first, scale, out, threads, half)
    lib.step_attention_one.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, c_int,
                                       c_int]
    lib.step_attention_one.restype = c_int
    _lib = lib
    return lib


def unavailable_reason() -> str | None:
    load()
    return _reason


def _threads(n: int) -> int:
    """torch's thread count, or 1 where n output rows are too few to pay for the hand-off."""
    return torch.get_num_threads() if rows.worth_splitting(n) else 1


def _library() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise UserError(f"the AVX2 kernel cannot be used here: {_reason}")
    return lib


MAX_MANY = 8  # the most matrices one call takes (MANY in q8_avx2.c)


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def _products(fn: Any, x: torch.Tensor, qs: list[torch.Tensor], extra: list[torch.Tensor],
              group: int | None) -> list[torch.Tensor]:
    """One call of a *_products entry point (q8_avx2.c says why one): x [M, K] against the matrices qs with their
    scales `extra`; the C side quantizes x, so no tensor but the outputs is made here."""
    assert 0 < len(qs) <= MAX_MANY
    x32 = x.float().contiguous()
    m, k = x32.shape
    rows = [q.shape[0] for q in qs]
    ys = [torch.empty((m, n), dtype=torch.float32) for n in rows]
    shape = (len(qs), _pointers(qs), _pointers(extra), (ctypes.c_int64 * len(rows))(*rows))
    args = (*shape, k) if group is None else (*shape, group, k)
    if fn(*args, x32.data_ptr(), m, _pointers(ys), _threads(sum(rows))) != 0:
        raise MemoryError("the kernel's workspace for the activations could not be allocated")
    return ys


def int8_matmuls(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """x [M, K] times each int8 q [N_j, K] (bf16 scales [N_j]) of `weights`: fp32 [M, N_j] each. One call: x is
    quantized once, and the output rows of all of them are split over the rank's threads together."""
    lib = _library()
    fn = lib.q8v_int8_products if isa() == "avx512-vnni" else lib.q8_int8_products
    return _products(fn, x, [q.contiguous() for q, _ in weights], [s.contiguous() for _, s in weights], None)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int8 q [N, K] (bf16 scales [N]): fp32 [M, N], output rows over the rank's threads."""
    return int8_matmuls(x, [(q, scales)])[0]


def int4_matmuls(x: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """x [M, K] times each int4 q [N_j, K/32, 16] (rows layout) with bf16 scales_zeros [N_j, K/G, 2] of `weights`
    (one group size G): fp32 [M, N_j] each, in one call as int8_matmuls."""
    lib = _library()
    szs = [sz.contiguous() for _, sz in weights]
    groups = szs[0].shape[1]
    assert all(sz.shape[1] == groups for sz in szs), "one group size"
    fn = lib.q8v_int4_products if isa() == "avx512-vnni" else lib.q8_int4_products
    return _products(fn, x, [q.contiguous() for q, _ in weights], szs, x.shape[-1] // groups)


def split_int4_loads() -> bool:
    """Whether q8_avx512.c's int4 decoding loads its weights in 256-bit halves: on AMD CPUs (q8_avx512.c says why)."""
    return cpu_vendor() == "AuthenticAMD"


def int4_matmul(x: torch.Tensor, q: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] times int4 q [N, K/32, 16] (rows layout), bf16 scales_zeros [N, K/G, 2]: fp32 [M, N]."""
    return int4_matmuls(x, [(q, scales_zeros)])[0]


PREFILL_MAX_ROWS = 16  # fp32 prefill kernels' rows of activations in linear(): beyond, oneDNN's blocking wins


# What prefill_avx512.c needs of the CPU (every AVX-512 CPU since Skylake-SP and Zen 4 has them)
AVX512_PREFILL_FLAGS = {"avx512f", "avx512bw", "avx512vl"}


def prefill_avx512() -> bool:
    """Whether the float prefill products run prefill_avx512.c here: where the CPU has AVX512_PREFILL_FLAGS (fp16's
    held to prefill_avx2.c by TPI_MPI_KERNEL_ISA=avx2, as the other products; fp32's always there: its AVX2 one is
    for CPUs without AVX-512)."""
    return AVX512_PREFILL_FLAGS <= cpu_flags()


def fp32_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times w [N, K] fp32: fp32 [M, N], output rows over the rank's threads: prefill_avx512.c where
    the CPU has AVX-512, else prefill_avx2.c (fp32_matmul_avx2)."""
    if not prefill_avx512():
        return fp32_matmul_avx2(x, w)
    return _prefill(_library().f32_matmul, x, w)


def fp16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (any float dtype) times fp16 w [N, K]: fp32 [M, N], summed in fp32 (prefill_avx512.c where the CPU has
    AVX-512, else prefill_avx2.c), output rows over the rank's threads."""
    if fp16_prefill_kernel() == "avx512":
        return _prefill(_library().f16_matmul_avx512, x, w)
    return _prefill(_library().f16_matmul, x, w)


def fp16_prefill_kernel() -> str:
    """"avx512" (prefill_avx512.c) or "avx2" (prefill_avx2.c): which one fp16_matmul runs here."""
    return "avx512" if prefill_avx512() and not held_to_avx2() else "avx2"


def fp32_matmul_avx2(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times w [N, K] fp32: fp32 [M, N] (prefill_avx2.c, where the CPU has no AVX-512F)."""
    return _prefill(_library().f32_matmul_avx2, x, w)


def _prefill(fn: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x32, w = x.float().contiguous(), w.contiguous()
    y = torch.empty((x32.shape[0], w.shape[0]), dtype=torch.float32)
    if fn(w.data_ptr(), w.shape[0], w.shape[1], x32.data_ptr(), x32.shape[0], y.data_ptr(), _threads(w.shape[0])) != 0:
        raise MemoryError("the kernel's workspace for the activations could not be allocated")
    return y


def _matvecs(fn: Any, x: torch.Tensor, ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """One row x times each w of `ws` through f16_matvec_many / f32_matvec_many: fp32 [1, N_j] each."""
    assert 0 < len(ws) <= MAX_MANY
    ws = [w.contiguous() for w in ws]
    x32 = x.reshape(-1).float().contiguous()
    rows = [w.shape[0] for w in ws]
    ys = [torch.empty((1, n), dtype=torch.float32) for n in rows]
    fn(len(ws), _pointers(ws), (ctypes.c_int64 * len(rows))(*rows), x32.shape[0], x32.data_ptr(), _pointers(ys),
       _threads(sum(rows)))
    return ys


def fp16_decode_kernel() -> str:
    """Which fp16 one-row product runs here: "f16-avx512" where the CPU has AVX-512F (f16_avx512.c), else
    "f16-avx2"; TPI_MPI_KERNEL_ISA=avx2 holds it to the AVX2 one, as it does the int8 and int4 products."""
    return "f16-avx512" if "avx512f" in cpu_flags() and not held_to_avx2() else "f16-avx2"


def fp16_matvecs(x: torch.Tensor, ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """[fp16_matvec(x, w) for w in ws], the same values, in one call: the output rows of all of them split over the
    rank's threads together."""
    lib = _library()
    return _matvecs(lib.f16v_matvec_many if fp16_decode_kernel() == "f16-avx512" else lib.f16_matvec_many, x, ws)


def fp32_matvecs(x: torch.Tensor, ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """One row x [1, K] times each fp32 w [N_j, K] of `ws` (f32_avx2.c): fp32 [1, N_j] each, in one call as
    fp16_matvecs."""
    return _matvecs(_library().f32_matvec_many, x, ws)


def fp16_matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One row x [1, K] (any float dtype) times fp16 w [N, K]: fp32 [1, N], output rows over the rank's threads."""
    return fp16_matvecs(x, [w])[0]


STEP_DTYPES = (torch.float32, torch.float16)  # what step_ops.c computes in


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of the rows of x [M, K] with weight w [K], both fp32 or both fp16 (step_ops.c): [M, K]."""
    assert x.dtype == w.dtype and x.dtype in STEP_DTYPES
    x = x.contiguous()
    out = torch.empty_like(x)
    _library().step_rms_norm(x.data_ptr(), w.contiguous().data_ptr(), x.shape[0], x.shape[1], eps, out.data_ptr(),
                             int(x.dtype == torch.float16))
    return out


def attention_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, first: int, scale: float) -> torch.Tensor:
    """One position's attention (step_ops.c): q [heads * dim], k, v [kv_heads * dim], contiguous, q and k modified
    (rotated by cos, sin [dim]); k, v written into the caches [kv_heads, capacity, dim] at pos; the output
    [heads * dim] attends to keys first .. pos. All in one dtype of STEP_DTYPES."""
    assert all(t.dtype == q.dtype for t in (k, v, cos, sin, k_cache, v_cache)) and q.dtype in STEP_DTYPES
    kv_heads, capacity, dim = k_cache.shape[-3:]
    heads = q.numel() // dim
    out = torch.empty(heads * dim, dtype=q.dtype)
    if _library().step_attention_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                     k_cache.data_ptr(), v_cache.data_ptr(), heads, kv_heads, dim, capacity, pos,
                                     first, scale, out.data_ptr(), torch.get_num_threads(),
                                     int(q.dtype == torch.float16)) != 0:
        raise MemoryError("the attention's workspace could not be allocated")
    return out
