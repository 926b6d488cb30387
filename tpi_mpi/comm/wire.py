"""How partial sums travel between ranks (`comm.dtype`): the wire formats and what each costs in bytes,
time and error.

    fp32   the float32 values themselves (4 bytes each)
    fp16   IEEE half precision (2 bytes), held as uint16 bit patterns: MPI has no standard half type
    bf16   bfloat16 (2 bytes), the upper half of the float32 pattern rounded to nearest even
    int8   blocks of 32 values as 32 int8 and one float32 scale (36 bytes per 32 values: 1.125 bytes each,
           0.28 x fp32), as distributed-llama's Q8 sync; the scale is max|x| / 127 of the block, each value
           round(x / scale). distributed-llama (and llama.cpp's Q8_0) keep the scale in fp16 (1.0625 bytes a
           value); fp32 costs 6 % more bytes and keeps every finite block finite (an fp16 scale overflows
           beyond 127 x 65504 and loses precision below 6e-5, which a partial sum can reach).

Sums are always taken in float32 by the algorithms (allreduce.py); a format only encodes and decodes.

The int8 error. Quantizing a block whose largest magnitude is A changes each value by at most half a step,
A / 254 (step A / 127), plus float32 rounding of the scale, the division and the product (relative 2^-24
each). A value that reaches the sum went through some number K of such quantizations (one per hop that
re-encodes a partial or running sum; `int8_quantizations`), each of a partial sum of a subset of the
ranks' inputs, so each A is at most M = the sum over ranks of the block's largest |input| (plus the error
already made, a second-order term). Hence, per block,

    |allreduce - exact sum| <= (K * M / 254 + (K + N) * 2^-22 * M) / (1 - K / 254)      (int8_error_bound)

(the division by 1 - K/254: each A may include the error B made before it, B <= K (M + B) / 254; the 2^-22
term: float32 rounding in each quantization and in each of the N - 1 additions). The bound holds per block
of 32 values as the algorithms cut them: ring's chunks start at multiples of 32 on this wire, so its
blocks are the same as everyone else's.

A block holding inf or NaN decodes as NaN in every position (its scale is not finite): the overflow shows
up as NaN on every rank, as it would in fp32.
"""

from __future__ import annotations

import time

import numpy as np

from tpi_mpi.comm.cost_model import WireCost

WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
# comm.dtype: a wire format, or "auto" (comm.algo=auto only): the cost model picks the wire too, among
# AUTO_WIRES. Lossy wires change the numerics, so auto picks one only where the user allowed it by choosing
# comm.dtype=auto; with a fixed comm.dtype (fp32 by default) it picks the algorithm alone.
AUTO_WIRES = ("fp32", "fp16", "int8")  # bf16: the bytes of fp16 with 3 fewer bits of precision, never better
WIRE_CHOICES = (*WIRE_DTYPES, "auto")
INT8_BLOCK = 32  # values per int8 block (one scale each)
_SCALE_BYTES = 4  # one float32 scale per block


def int8_blocks(count: int) -> int:
    return -(-count // INT8_BLOCK)


class WireFormat:
    """Encode float32 partial sums to what travels (`comm.dtype`), and decode them. A wire array of `count`
    values is one numpy array of `size(count)` elements of `dtype`; the int8 format packs its scales first,
    then the int8 values, into one uint8 array, so that every message is one MPI buffer."""

    def __init__(self, name: str):
        if name not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {name!r}: choose one of {', '.join(WIRE_DTYPES)}")
        self.name = name
        self.dtype = {"fp32": np.float32, "fp16": np.uint16, "bf16": np.uint16, "int8": np.uint8}[name]
        self.lossless = name == "fp32"

    def size(self, count: int) -> int:
        """Elements of the wire array that carries `count` values."""
        if self.name == "int8":
            return count + _SCALE_BYTES * int8_blocks(count)
        return count

    def nbytes(self, count: int) -> int:
        """Bytes on the wire for `count` values."""
        return self.size(count) * np.dtype(self.dtype).itemsize

    def empty(self, count: int) -> np.ndarray:
        """A wire array able to carry `count` values."""
        return np.empty(self.size(count), dtype=self.dtype)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 -> wire array. For fp32 this is `x` itself, not a copy."""
        if self.name == "fp32":
            return x
        if self.name == "fp16":
            return x.astype(np.float16).view(np.uint16)
        if self.name == "int8":
            return _int8_encode(x)
        # bf16: round to nearest even on the upper 16 bits of the float32 pattern; NaN stays NaN.
        u = x.view(np.uint32)
        rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)

    def decode(self, w: np.ndarray, out: np.ndarray) -> None:
        """Wire array -> float32, into `out` (its size says how many values `w` carries)."""
        if self.name == "fp32":
            if w is not out:
                out[...] = w
        elif self.name == "fp16":
            out[...] = w.view(np.float16)
        elif self.name == "int8":
            _int8_decode(w, out)
        else:
            out.view(np.uint32)[...] = w.astype(np.uint32) << 16

    def to_fp32(self, w: np.ndarray, count: int | None = None) -> np.ndarray:
        """Wire array -> float32: `w` itself for fp32, else a new array of `count` values (default: all
        that `w` can carry)."""
        if self.name == "fp32":
            return w
        if count is None:
            count = w.size if self.name != "int8" else _int8_count(w.size)
        out = np.empty(count, dtype=np.float32)
        self.decode(w, out)
        return out

    def round(self, x: np.ndarray) -> np.ndarray:
        """Round `x` in place to what the wire carries, and return its wire form."""
        w = self.encode(x)
        self.decode(w, x)
        return w


def _int8_count(size: int) -> int:
    """Values carried by an int8 wire array of `size` bytes (the inverse of WireFormat.size)."""
    blocks = -(-size // (INT8_BLOCK + _SCALE_BYTES))
    return size - _SCALE_BYTES * blocks


def _int8_encode(x: np.ndarray) -> np.ndarray:
    count = x.size
    nb = int8_blocks(count)
    w = np.empty(count + _SCALE_BYTES * nb, dtype=np.uint8)
    scales = w[:_SCALE_BYTES * nb].view(np.float32)
    q = w[_SCALE_BYTES * nb:].view(np.int8)
    whole = (count // INT8_BLOCK) * INT8_BLOCK
    if whole:
        _int8_encode_blocks(x[:whole].reshape(-1, INT8_BLOCK), scales[:whole // INT8_BLOCK],
                            q[:whole].reshape(-1, INT8_BLOCK))
    if whole < count:  # the last, shorter block
        _int8_encode_blocks(x[whole:].reshape(1, -1), scales[nb - 1:], q[whole:].reshape(1, -1))
    return w


def _int8_encode_blocks(x: np.ndarray, scales: np.ndarray, q: np.ndarray) -> None:
    """x: (blocks, values) float32 -> scales (blocks,) float32 and q (blocks, values) int8, in place."""
    # max |x| per block on the float32 bit patterns with the sign cleared: for non-negative floats the integer
    # order is the float order (NaN above inf), and numpy reduces int32 rows of 32 several times faster.
    amax = (x.view(np.int32) & np.int32(0x7FFFFFFF)).max(axis=1).view(np.float32)
    scale = amax / np.float32(127)
    scales[...] = scale  # inf or NaN where the block holds inf or NaN: it decodes as NaN
    finite = np.isfinite(scale)
    divisor = np.where(finite & (scale > 0), scale, np.float32(1))  # an all-zero block: q = 0
    v = x / divisor[:, None]  # a division, not a product with 1/scale: 1/scale overflows for subnormal scales
    if not finite.all():
        v[~finite] = 0
    np.rint(v, out=v)
    np.clip(v, -127, 127, out=v)  # |x / scale| <= 127 up to float32 rounding: the clip only catches that
    q[...] = v


def _int8_decode(w: np.ndarray, out: np.ndarray) -> None:
    count = out.size
    nb = int8_blocks(count)
    scales = w[:_SCALE_BYTES * nb].view(np.float32)
    q = w[_SCALE_BYTES * nb:_SCALE_BYTES * nb + count].view(np.int8)
    whole = (count // INT8_BLOCK) * INT8_BLOCK
    flat = out.reshape(-1)
    if not np.isfinite(scales).all():  # a block that held inf or NaN: NaN throughout (0 x inf), no warning
        with np.errstate(invalid="ignore"):
            _int8_multiply(q, scales, flat, whole, nb)
        return
    _int8_multiply(q, scales, flat, whole, nb)


def _int8_multiply(q: np.ndarray, scales: np.ndarray, flat: np.ndarray, whole: int, nb: int) -> None:
    count = flat.size
    if whole:
        np.multiply(q[:whole].reshape(-1, INT8_BLOCK), scales[:whole // INT8_BLOCK, None],
                    out=flat[:whole].reshape(-1, INT8_BLOCK), dtype=np.float32)
    if whole < count:
        np.multiply(q[whole:], scales[nb - 1], out=flat[whole:], dtype=np.float32)


def int8_quantizations(algo: str, n: int) -> int:
    """How many int8 quantizations (encodes of a partial or running sum) the most-encoded value of the sum
    went through, for each of our algorithms on n ranks (see allreduce.py):

        star  n     the n-1 workers' partials, then the sum rank 0 sends back
        mesh  n     every rank's partial, once
        ring  n     the running sum at each of the n-1 reduce-scatter hops, then the owner's sum (the
                    all-gather forwards the owner's bytes as they are)
        tree  2 p - 2 + e + (1 if e)   recursive doubling over p = the largest power of two <= n: both
                    inputs of every pairwise sum, 2p - 2 in the binary tree of sums; e = n - p extra ranks
                    fold their partials in first and get the rounded sum back
    """
    if n <= 1:
        return 0
    if algo in ("star", "mesh", "ring"):
        return n
    if algo == "tree":
        p2 = 1 << (n.bit_length() - 1)
        extra = n - p2
        return 2 * p2 - 2 + extra + (1 if extra else 0)
    raise ValueError(f"no int8 error bound for allreduce algorithm {algo!r}")


def int8_error_bound(algo: str, inputs: list[np.ndarray]) -> np.ndarray:
    """Per value: the most by which the int8-wire allreduce of `inputs` (one float32 array per rank) can
    differ from the exact sum (the module's docstring derives it)."""
    n = len(inputs)
    k = int8_quantizations(algo, n)
    if k >= 254:
        raise ValueError(f"the int8 error bound needs fewer than 254 quantizations, {algo} on {n} ranks has {k}")
    count = inputs[0].size
    nb = int8_blocks(count)
    pad = nb * INT8_BLOCK - count
    m = np.zeros(nb, dtype=np.float64)
    for x in inputs:
        a = np.abs(np.concatenate([x.reshape(-1).astype(np.float64), np.zeros(pad)]))
        m += a.reshape(nb, INT8_BLOCK).max(axis=1)
    per_block = (k * m / 254 + (k + n) * 2.0 ** -22 * m) / (1 - k / 254)
    return np.repeat(per_block, INT8_BLOCK)[:count].reshape(inputs[0].shape)


def measure_codecs(wires: tuple[str, ...], values: int = 8192, repeats: int = 20) -> dict[str, WireCost]:
    """Bytes per value, and median seconds per value to encode and to decode, of each wire format on a
    message of `values` standard-normal values (one hidden state of Llama 2-70B by default). fp32 goes as it
    is: no cost."""
    x = np.random.default_rng(0).standard_normal(values).astype(np.float32)
    out = np.empty_like(x)
    costs = {}
    for name in wires:
        fmt = WireFormat(name)
        if fmt.lossless:
            costs[name] = WireCost(fmt.nbytes(values) / values)
            continue
        enc, dec = [], []
        for _ in range(repeats + 2):  # the first two warm up
            t0 = time.perf_counter()
            w = fmt.encode(x)
            t1 = time.perf_counter()
            fmt.decode(w, out)
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        costs[name] = WireCost(fmt.nbytes(values) / values, float(np.median(enc[2:])) / values,
                               float(np.median(dec[2:])) / values)
    return costs
