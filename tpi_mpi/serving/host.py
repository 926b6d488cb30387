"""What the server and the terminal chat share: the engine on every rank, a Session on rank 0.

The workers run the engine loop as for one prompt (engine.Worker.serve) and never see text or token ids;
they ignore SIGINT and SIGTERM (mpiexec passes both to every rank), because rank 0, which gets them too,
stops them once its requests are dealt with.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpi4py import MPI

from tpi_mpi.errors import UserError, agree_or_abort
from tpi_mpi.job import load_tokenizer, open_engine, set_threads, start_together
from tpi_mpi.serving.scheduler import Session


def model_name(cfg: Any) -> str:
    """The model's id in the API: serve.model_name, else the checkpoint's (or the split's) folder name."""
    if cfg.serve.model_name:
        return str(cfg.serve.model_name)
    return Path(cfg.model.path or cfg.model.shards).resolve().name


def eos_ids(master: Any, tok: Any, stop_on_eos: bool) -> set[int]:
    if not stop_on_eos:
        return set()
    eos = master.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def run_session(comm: MPI.Comm, cfg: Any, main: Callable[[Session, Any, Any], None],
                prepare: Callable[[], Any] | None = None, max_batch: int = 1) -> None:
    """Every rank: load the engine. Rank 0: `prepare()` (before the others are told to start: e.g. bind the
    port, so that a port in use stops the job at once), then `main(session, cfg, prepared)`, then stop the
    workers. An exception from main ends the job through run_or_abort (the ranks may be out of step).
    `max_batch`: KV cache slots, sequences decoded together (serve.max_batch, for the server)."""
    set_threads(comm, cfg.threads)
    error = None
    if comm.rank == 0 and cfg.baseline is not None:
        error = f"baseline={cfg.baseline}: the server and the chat run tensor parallelism only: set baseline=null"
    agree_or_abort(comm, error)
    engine, path = open_engine(comm, cfg, max_batch)
    if comm.rank != 0:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        start_together(comm)
        engine.serve()
        engine.close()
        return
    master = engine
    tok = load_tokenizer(cfg, path)
    if tok is None:
        raise UserError(f"no tokenizer next to the shards ({path}/rank_0) or in model.path={cfg.model.path}: "
                        "the server and the chat need one")
    prepared = prepare() if prepare is not None else None
    context = min(cfg.memory.kv_cache_tokens or master.max_positions, master.max_positions)
    session = Session(master, tok, context, eos_ids(master, tok, cfg.generation.stop_on_eos),
                      cfg.serve.prompt_cache)
    start_together(comm)
    master.end_sequence()  # the workers wait for the first request sleeping
    main(session, cfg, prepared)
    master.stop()
    master.close()
