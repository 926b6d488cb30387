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
    ({"algo": "ring", "dtype": "int4"}, "unknown comm.dtype='int4'"),
    ({"algo": "ring", "dtype": "auto"}, "comm.dtype=auto lets comm.algo=auto choose the wire"),
    ({"algo": "mpi", "dtype": "int8"}, "comm.algo=mpi sums fp32 only"),
    ({"algo": "mpi", "dtype": "fp16"}, "comm.algo=mpi sums fp32 only"),
    ({"algo": "star", "mpi_algorithm": "ring"}, "applies to comm.algo=mpi only"),
    ({"algo": "mpi", "mpi_algorithm": "bogus"}, "unknown comm.mpi_algorithm='bogus'"),
])
def test_bad_comm_keys(comm: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        build_config(config(**comm))


@pytest.mark.parametrize("algo,dtype", [("star", "int8"), ("ring", "int8"), ("tree", "int8"), ("mesh", "int8"),
                                        ("auto", "int8"), ("auto", "auto")])
def test_int8_and_auto_wires_are_accepted(algo: str, dtype: str) -> None:
    assert build_config(config(algo=algo, dtype=dtype)).comm == CommConfig(algo=algo, dtype=dtype)


def test_mpi_algorithm_must_reach_mpich_through_mpirun() -> None:
    cfg = build_config(config(algo="mpi", dtype="fp32"))
    cfg = type(cfg)(**{**cfg.__dict__, "comm": CommConfig(algo="mpi", mpi_algorithm="ring")})
    with pytest.raises(UserError, match="mpirun -genv MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM ring"):
        validate(cfg, env={})
    validate(cfg, env={"MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM": "ring"})
