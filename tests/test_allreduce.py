import pytest
from conftest import SCRIPTS, mpirun

from tpi_mpi.comm.allreduce import ALGORITHMS, WIRE_DTYPES


@pytest.mark.parametrize("n", range(1, 9))
def test_every_algorithm_equals_numpy_sum(n: int) -> None:
    """Every algorithm x wire dtype: the numpy sum, bitwise the same on every rank, counters right."""
    proc = mpirun(n, [str(SCRIPTS / "allreduce_check.py")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for algo in ALGORITHMS:
        for wire in WIRE_DTYPES if algo != "mpi" else ("fp32",):
            assert f"ok {algo} {wire} n={n}" in proc.stdout, proc.stdout
    assert f"ok star-bcast n={n}" in proc.stdout


@pytest.mark.parametrize("algo", ["ring", "recursive_doubling"])
def test_mpich_algorithm_is_forced_through_the_environment(algo: str) -> None:
    proc = mpirun(3, [str(SCRIPTS / "allreduce_check.py")], timeout=120,
                  env={"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": algo})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok mpi fp32 n=3" in proc.stdout
