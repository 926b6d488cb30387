"""Wire formats without MPI: sizes, the int8 round trip within half a step per block, special values."""

import numpy as np
import pytest

from tpi_mpi.comm.wire import INT8_BLOCK, WireFormat, int8_error_bound, int8_quantizations


@pytest.mark.parametrize("count", [1, 7, 31, 32, 33, 100, 8193])
def test_int8_round_trip_within_half_a_step_per_block(count: int) -> None:
    wire = WireFormat("int8")
    x = (np.random.default_rng(count).standard_normal(count) * 10 ** np.random.default_rng(0).uniform(
        -3, 3, count)).astype(np.float32)  # magnitudes over 6 decades, blocks of very different scales
    w = wire.encode(x)
    assert w.dtype == np.uint8 and w.size == wire.nbytes(count) == count + 4 * -(-count // INT8_BLOCK)
    y = wire.to_fp32(w, count)
    assert np.array_equal(y, wire.to_fp32(w))  # the count follows from the size
    blocks = -(-count // INT8_BLOCK)
    amax = np.zeros(blocks * INT8_BLOCK)
    amax[:count] = np.abs(x)
    half_step = np.repeat(amax.reshape(blocks, INT8_BLOCK).max(axis=1) / 254, INT8_BLOCK)[:count]
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err <= half_step * (1 + 2.0 ** -20)), (err / half_step).max()
    if count >= INT8_BLOCK:  # a half step is what it takes, not a loose bound (one value alone is exact)
        assert (err / half_step).max() > 0.5
    # encoding what was decoded gives the same values back (what a rank keeps is what it would send)
    assert np.array_equal(wire.to_fp32(wire.encode(y), count), y)


def test_int8_special_blocks() -> None:
    wire = WireFormat("int8")
    x = np.zeros(4 * INT8_BLOCK, dtype=np.float32)
    x[1] = np.inf  # block 0: inf -> NaN throughout
    x[INT8_BLOCK + 2] = np.nan  # block 1: NaN -> NaN throughout
    x[2 * INT8_BLOCK:3 * INT8_BLOCK] = 1e-41  # block 2: subnormal values keep their size
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no warning on the way (underflow: ignored)
        y = wire.to_fp32(wire.encode(x), x.size)
    assert np.isnan(y[:2 * INT8_BLOCK]).all()
    assert np.allclose(y[2 * INT8_BLOCK:3 * INT8_BLOCK], 1e-41, rtol=1e-2, atol=0)
    assert (y[3 * INT8_BLOCK:] == 0).all()  # block 3: all zero stays zero


def test_wire_sizes() -> None:
    assert [WireFormat(w).nbytes(8192) for w in ("fp32", "fp16", "bf16", "int8")] == [32768, 16384, 16384, 9216]
    with pytest.raises(ValueError, match="unknown wire dtype 'int4'"):
        WireFormat("int4")


def test_int8_bound_counts_each_quantization_on_the_path() -> None:
    assert [int8_quantizations("star", n) for n in (1, 2, 8)] == [0, 2, 8]
    assert [int8_quantizations("ring", n) for n in (2, 3, 8)] == [2, 3, 8]
    # tree: 2p - 2 in the tree of pairwise sums; extra ranks: their partials and one more rounding
    assert [int8_quantizations("tree", n) for n in (2, 3, 4, 5, 8)] == [2, 4, 6, 8, 14]
    inputs = [np.full(40, 2.0, dtype=np.float32), np.full(40, -1.0, dtype=np.float32)]
    bound = int8_error_bound("mesh", inputs)
    assert bound.shape == (40,) and bound[0] == pytest.approx(2 * 3.0 / 254, rel=1e-2)
