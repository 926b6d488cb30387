"""comm.* keys: validation is one clear line; comm.mpi_algorithm must come through mpirun's environment."""

import re

import pytest

from tpi_mpi.config import CommConfig, build_config, validate
from tpi_mpi.errors import UserError

BASE = {"model": {"path": "models/tiny"}, "prompt_ids": [1, 2]}


def config(**comm: object) -> dict:
    return {**BASE, "comm": comm}


@pytest.mark.parametrize("algo", ["star", "ring", "mesh", "tree", "mpi", "auto"])
def test_every_algorithm_is_accepted(algo: str) -> None:
    assert build_config(config(algo=algo)).comm == CommConfig(algo=algo)


@pytest.mark.parametrize("comm,message", [
    ({"algo": "foo"}, "unknown comm.algo='foo'"),
    ({"algo": "ring", "dtype": "int8"}, "unknown comm.dtype='int8'"),
    ({"algo": "mpi", "dtype": "fp16"}, "comm.algo=mpi sums fp32 only"),
    ({"algo": "star", "mpi_algorithm": "ring"}, "applies to comm.algo=mpi only"),
    ({"algo": "mpi", "mpi_algorithm": "bogus"}, "unknown comm.mpi_algorithm='bogus'"),
])
def test_bad_comm_keys(comm: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        build_config(config(**comm))


def test_mpi_algorithm_must_reach_mpich_through_mpirun() -> None:
    cfg = build_config(config(algo="mpi", dtype="fp32"))
    cfg = type(cfg)(**{**cfg.__dict__, "comm": CommConfig(algo="mpi", mpi_algorithm="ring")})
    with pytest.raises(UserError, match="mpirun -genv MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM ring"):
        validate(cfg, env={})
    validate(cfg, env={"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"})
