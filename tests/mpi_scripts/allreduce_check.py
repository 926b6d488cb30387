"""Under mpirun: each allreduce algorithm equals the numpy sum, bitwise identical on every rank.

Exits non-zero (through an AssertionError on some rank and MPI_Abort) on any mismatch.
"""

import sys

import numpy as np
from mpi4py import MPI

from tpi_mpi.allreduce import ALGORITHMS, make_allreduce

comm = MPI.COMM_WORLD
for algo in ALGORITHMS:
    ar = make_allreduce(algo, comm)
    for size in (0, 1, 7, 1000, 8193):
        for shape in ((size,), (1, size)):
            # Every rank can rebuild every other rank's input from the shared seed.
            inputs = [np.random.default_rng(size * 100 + r).standard_normal(shape).astype(np.float32)
                      for r in range(comm.size)]
            buf = inputs[comm.rank].copy()
            ar(buf)
            expected = np.sum(np.stack(inputs).astype(np.float64), axis=0)
            try:
                np.testing.assert_allclose(buf, expected, rtol=1e-5, atol=1e-5)
                everyone = comm.allgather(buf.tobytes())
                assert all(b == everyone[0] for b in everyone), "ranks disagree bitwise"
            except AssertionError as exc:
                print(f"rank {comm.rank} algo={algo} size={size}: {exc}", file=sys.stderr, flush=True)
                comm.Abort(1)
    if comm.rank == 0:
        print(f"ok {algo} n={comm.size} calls={ar.stats.calls}", flush=True)
