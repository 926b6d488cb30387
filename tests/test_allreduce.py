import pytest
from conftest import SCRIPTS, mpirun


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_every_algorithm_equals_numpy_sum(n: int) -> None:
    proc = mpirun(n, [str(SCRIPTS / "allreduce_check.py")], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok star" in proc.stdout and "ok mpi" in proc.stdout
