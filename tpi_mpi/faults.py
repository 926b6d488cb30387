"""Test only: a failure injected at a named stage of a job, on a named rank.

    TPI_MPI_FAIL_AT=STAGE:RANK mpirun -n N python -m tpi_mpi.run ...

makes `fail_point(STAGE, RANK)` raise InjectedFailure there, standing for any bug or unexpected error at
that stage (tests/test_fail_anywhere.py checks that each one ends the whole job within seconds). The variable
is read once at import; unset, as it always is outside those tests, every fail point is one comparison
with None. Standard library only: the sentinel's module imports it.
"""

from __future__ import annotations

import os
import time

# In the order a job reaches them (docs/reliability.md has the table of what each one measured).
STAGES = ("startup", "sentinel", "config", "shards", "memplan", "load", "generate", "record")
_FAIL_AT = os.environ.get("TPI_MPI_FAIL_AT")


class InjectedFailure(RuntimeError):
    """Raised by fail_point under TPI_MPI_FAIL_AT."""


def fail_point(stage: str, rank: int) -> None:
    """Raise InjectedFailure if TPI_MPI_FAIL_AT names this stage and rank; a no-op otherwise."""
    if _FAIL_AT is None:
        return
    assert stage in STAGES, stage
    if _FAIL_AT == f"{stage}:{rank}":
        # The time lets a test measure how long the job took to end after the failure.
        raise InjectedFailure(f"injected failure at {stage} on rank {rank} (TPI_MPI_FAIL_AT, test only) "
                              f"at unix time {time.time():.3f}")
