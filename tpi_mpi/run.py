"""Entry point: `mpirun -n N python -m tpi_mpi.run [hydra overrides]`.

Only rank 0 runs Hydra (so only it writes Hydra's output folder and logs); it sends the resolved
config, without the prompt, to the workers. From here the inference path is:
    job() -> Master/Worker (engine.py) -> ShardedDecoder (models/llama.py) -> allreduce (comm/allreduce.py)
    -> block sources: resident or the layer prefetcher (weights/prefetch.py)
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

from tpi_mpi.comm import sentinel
from tpi_mpi.errors import UserError, main_guard, run_or_abort
from tpi_mpi.faults import fail_point
from tpi_mpi.job import (
    generate_record,
    load_tokenizer,
    open_engine,
    report,
    set_threads,
    start_together,
)

log = logging.getLogger("tpi_mpi")


@main_guard  # an exception anywhere (the sentinel, Hydra, between jobs) aborts every rank: no hang
def main(entry: Callable[[MPI.Comm, Any], None] | None = None) -> None:
    """Rank 0 reads the config with Hydra and sends it to the others; every rank then runs `entry(comm, cfg)`
    (default: job, one generation; tpi_mpi.serve and tpi_mpi.chat give theirs)."""
    entry = entry or job
    comm = MPI.COMM_WORLD
    fail_point("startup", comm.rank)
    sentinel.start(comm)  # names a rank that dies: mpiexec kills the others before they could
    if comm.rank == 0:
        _master_main(comm, entry)
        return
    while True:  # one job per message: a Hydra multirun sends several
        msg = comm.bcast(None, root=0)
        if msg[0] == "exit":  # rank 0 is done, or stopped in Hydra (--help, --cfg)
            sys.exit(msg[1])
        fail_point("config", comm.rank)
        run_or_abort(comm, functools.partial(entry, comm, msg[1]))


def _master_main(comm: MPI.Comm, entry: Callable[[MPI.Comm, Any], None]) -> None:
    import hydra
    from hydra.errors import CompactHydraException
    from omegaconf import DictConfig, OmegaConf

    # An absolute path: relative, Hydra would look for a package when this module is imported (tpi_mpi.serve).
    @hydra.main(version_base=None, config_path=str(Path(__file__).resolve().parent.parent / "conf"),
                config_name="config")
    def hydra_entry(dcfg: DictConfig) -> None:
        from tpi_mpi.config import build_config

        fail_point("config", 0)  # inside Hydra's run_job: its own error handling must not swallow it
        try:
            cfg = build_config(OmegaConf.to_container(dcfg, resolve=True))  # type: ignore[arg-type]
        except UserError as exc:
            print(f"tpi_mpi: error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
        comm.bcast(("run", cfg.public()), root=0)
        run_or_abort(comm, lambda: entry(comm, cfg))

    # Hydra would print an error of its own start-up (its output folder on a full disk) and sys.exit(1);
    # raised instead, it becomes main_guard's one line and an abort like any other.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    code: Any = 0
    try:
        hydra_entry()
    except SystemExit as exc:  # --help, --cfg, or a bad value (build_config printed its line)
        code = exc.code if isinstance(exc.code, int) else 1
    except CompactHydraException as exc:  # an override Hydra cannot apply: the user's to fix
        cause = f"; {exc.__cause__}" if exc.__cause__ is not None else ""
        raise UserError(" ".join(f"{exc}{cause}".split())) from None
    sentinel.stopping()  # from here on, ranks exiting is the plan
    comm.bcast(("exit", code), root=0)  # releases the workers, also if Hydra stopped early
    if code:
        sys.exit(code)


def job(comm: MPI.Comm, cfg: Any) -> None:
    set_threads(comm, cfg.threads)
    if cfg.baseline is not None:  # transformers, accelerate or pipeline, in the same harness
        from tpi_mpi.baselines.harness import baseline_job

        baseline_job(comm, cfg)
        return
    engine, path = open_engine(comm, cfg)
    if comm.rank != 0:
        start_together(comm)  # every rank loaded: from here a long wait in a collective is a stall
        engine.serve()
        engine.close()
        fail_point("record", comm.rank)
        comm.gather(engine.rank_record(), root=0)
        return
    master = engine
    tok = load_tokenizer(cfg, path)
    start_together(comm)
    try:
        record = generate_record(master, cfg, path, tok)
    finally:
        master.stop()  # also on error, so that the workers are not left waiting
    master.close()
    record["ranks"] = comm.gather(master.rank_record(), root=0)
    fail_point("record", 0)
    report(record, cfg)


if __name__ == "__main__":
    main()
