import re

import pytest
from conftest import SCRIPTS, mpirun

from tpi_mpi.comm.allreduce import ALGORITHMS, WIRE_DTYPES


@pytest.mark.parametrize("n", range(1, 9))
def test_every_algorithm_equals_numpy_sum(n: int) -> None:
    """Every algorithm x wire dtype: the numpy sum, bitwise the same on every rank, counters right; on the
    int8 wire every value within its derived bound (the script checks each value; here the worst ratio);
    comm.dtype=auto picks int8 on a slow link and fp32 on a fast one, comm.dtype=fp32 keeps fp32 on both."""
    proc = mpirun(n, [str(SCRIPTS / "allreduce_check.py")], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for algo in ALGORITHMS:
        for wire in WIRE_DTYPES if algo != "mpi" else ("fp32",):
            assert f"ok {algo} {wire} n={n}" in proc.stdout, proc.stdout
    ratios = [float(m) for m in re.findall(r"int8 n=\d+ .* max_error/bound=([0-9.]+)", proc.stdout)]
    assert len(ratios) == len(ALGORITHMS) - 1 and all(r <= 1.0 for r in ratios), proc.stdout
    if n > 1:  # the bound is not vacuous: the worst value uses a good part of it
        assert max(ratios) > 0.05, ratios
    for wire in ("fp32", "int8"):
        assert f"ok star-bcast {wire} n={n}" in proc.stdout
    # a fixed comm.dtype (fp32, the default) stays what it is, even where int8 would be faster
    picked = dict(re.findall(r"ok auto-wire ([\w-]+) n=\d+ picked=(\S+)", proc.stdout))
    want = {"slow": "int8", "fast": "fp32", "slow-fixed-fp32": "fp32"}
    assert picked == (want if n > 1 else dict.fromkeys(want, "-")), proc.stdout


@pytest.mark.parametrize("algo", ["ring", "recursive_doubling"])
def test_mpich_algorithm_is_forced_through_the_environment(algo: str) -> None:
    proc = mpirun(3, [str(SCRIPTS / "allreduce_check.py")], timeout=120,
                  env={"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": algo})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok mpi fp32 n=3" in proc.stdout
