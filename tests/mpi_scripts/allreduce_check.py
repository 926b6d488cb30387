"""Under mpirun: each allreduce algorithm, on each wire dtype, equals the numpy sum and is bitwise
identical on every rank; the byte counters match what each algorithm moves.

Exits non-zero (through an AssertionError on some rank and MPI_Abort) on any mismatch.
"""

import sys

import numpy as np
from mpi4py import MPI

from tpi_mpi.comm.allreduce import ALGORITHMS, WIRE_DTYPES, StarAllreduce, make_allreduce

# Inputs are standard normal: the sum's error bound is relative to sqrt(N) and the wire's precision
# (fp16: 11 bits, bf16: 8 bits), rounded at most about log2(N) + 2 times along the way.
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-2, "bf16": 1.5e-1}

comm = MPI.COMM_WORLD
n = comm.size
cases = [(algo, wire) for algo in ALGORITHMS for wire in WIRE_DTYPES if algo != "mpi" or wire == "fp32"]
for algo, wire in cases:
    ar = make_allreduce(algo, comm, wire)
    sizes = (0, 1, 7, n * 3 + 1, 1000, 8193)
    for size in sizes:
        for shape in ((size,), (1, size)):
            # Every rank can rebuild every other rank's input from the shared seed.
            inputs = [np.random.default_rng(size * 100 + r).standard_normal(shape).astype(np.float32)
                      for r in range(n)]
            buf = inputs[comm.rank].copy()
            ar(buf)
            expected = np.sum(np.stack(inputs).astype(np.float64), axis=0)
            try:
                np.testing.assert_allclose(buf, expected, rtol=TOLERANCE[wire], atol=TOLERANCE[wire] * np.sqrt(n))
                everyone = comm.allgather(buf.tobytes())
                assert all(b == everyone[0] for b in everyone), "ranks disagree bitwise"
            except AssertionError as exc:
                print(f"rank {comm.rank} algo={algo} wire={wire} size={size}: {exc}", file=sys.stderr, flush=True)
                comm.Abort(1)
    # Counters: calls always; bytes as each algorithm moves them (summed over ranks, sent = received).
    s = ar.stats
    assert s.calls == 2 * len(sizes), s
    totals = comm.allreduce(np.array([s.bytes_sent, s.bytes_received]), op=MPI.SUM)
    assert totals[0] == totals[1] or algo == "mpi", (algo, totals)
    item = 4 if wire == "fp32" else 2
    payload = 2 * sum(sizes) * item  # per rank, both shapes
    expected_sent = {"star": 2 * (n - 1) * payload, "mesh": n * (n - 1) * payload,
                     "ring": 2 * (n - 1) * payload, "mpi": n * payload}.get(algo)
    if n > 1 and expected_sent is not None:
        assert totals[0] == expected_sent, (algo, wire, totals[0], expected_sent)
    if n == 1:
        assert s.bytes_sent == s.bytes_received == 0, s
    if comm.rank == 0:
        print(f"ok {algo} {wire} n={n} calls={s.calls} sent={totals[0]}", flush=True)

# Star with MPI_Bcast on the way back: same sum, same bits.
ar = StarAllreduce(comm, bcast=True)
inputs = [np.random.default_rng(r).standard_normal(1001).astype(np.float32) for r in range(n)]
buf = inputs[comm.rank].copy()
ar(buf)
np.testing.assert_allclose(buf, np.sum(np.stack(inputs).astype(np.float64), axis=0), rtol=1e-5, atol=1e-5)
assert all(b == buf.tobytes() for b in comm.allgather(buf.tobytes()))
if comm.rank == 0:
    print(f"ok star-bcast n={n}", flush=True)
