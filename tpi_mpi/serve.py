"""Entry point: `mpirun -n N python -m tpi_mpi.serve model.path=DIR [overrides] serve.port=8000`.

An OpenAI-compatible HTTP server on rank 0 (docs/serving.md): the HTTP side (Starlette on uvicorn) runs in
a thread of its own, the engine (every MPI call) on rank 0's main thread; scheduler.EngineLoop is the
queue between them. SIGINT or SIGTERM (Ctrl-C, scancel) stop it: the running request gets an error, every
rank exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from typing import Any

from mpi4py import MPI

from tpi_mpi import errors
from tpi_mpi.errors import UserError, main_guard
from tpi_mpi.serving.batch_loop import BatchLoop
from tpi_mpi.serving.host import model_name, run_session
from tpi_mpi.serving.scheduler import EngineLoop, Finished, Request, Session

STARTUP_S = 30.0  # the HTTP thread must be up by then
ABORT_FLUSH_S = 0.5  # the job is going down: time for the HTTP thread to send its clients the error


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model is served: a port in use is one line at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise UserError(f"cannot listen on serve.host={host} serve.port={port}: {exc.strerror or exc}") from None
    sock.set_inheritable(False)
    return sock


def url(host: str, port: int) -> str:
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/v1"


def _serve(session: Session, cfg: Any, sock: socket.socket) -> None:
    import uvicorn

    from tpi_mpi.serving.app import ServerState, make_app
    from tpi_mpi.serving.metrics import Metrics

    s = cfg.serve
    metrics = Metrics()

    def finished(req: Request, result: Finished | None, outcome: str) -> None:
        metrics.finished(req.label, outcome, result, result.queued_s if result else None, req.generated)

    engine: EngineLoop
    if s.max_batch > 1:  # continuous batching: up to max_batch requests generate together
        metrics.batch_slots.set(s.max_batch)
        engine = BatchLoop(session, s.max_batch, s.prefill_chunk, s.queue_size, s.heartbeat_s, finished,
                           metrics.batch_pass)
    else:
        metrics.batch_slots.set(1)
        engine = EngineLoop(session, s.queue_size, s.heartbeat_s, finished)
    master = session.master
    name = model_name(cfg)
    state = ServerState(engine, session.tok, name, session.context, master.vocab_size, master.comm.size, metrics,
                        s.api_key, s.max_body_bytes, s.max_tokens, s.health_timeout_s, tuple(s.chat_stop))
    server = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off",
                                           access_log=False, timeout_graceful_shutdown=2))

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.close()  # the HTTP side is gone (stopped, or failed): so is the server

    def stop(signum: int, _frame: Any) -> None:
        print(f"tpi_mpi: {signal.Signals(signum).name}: stopping the server", file=sys.stderr, flush=True)
        engine.close()

    def going_down(message: str) -> None:  # e.g. the watchdog found a rank stalled: tell the clients first
        engine.fail_all(f"the job is ending: {message}")
        time.sleep(ABORT_FLUSH_S)

    errors.before_abort(going_down)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    thread = threading.Thread(target=http, name="tpi_mpi-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_S
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise UserError(f"the HTTP server did not start within {STARTUP_S:g} s")
    port = sock.getsockname()[1]
    print(f"tpi_mpi: serving {name} on {url(s.host, port)} with {master.comm.size} ranks "
          f"(context {session.context} tokens, {s.max_batch} at once{', API key required' if s.api_key else ''})",
          file=sys.stderr, flush=True)
    try:
        engine.run()
    finally:
        server.should_exit = True  # the running and waiting requests have had their answer
        thread.join(timeout=5)
    print("tpi_mpi: server stopped", file=sys.stderr, flush=True)
    if isinstance(engine, BatchLoop):
        record = {**engine.record(), "world_size": master.comm.size, "config": cfg.to_json()}
        print(f"[tpi_mpi serve] {engine.summary()}", file=sys.stderr, flush=True)
        if cfg.output.json:
            from tpi_mpi.results import write_json_atomic

            write_json_atomic(cfg.output.json, record)


def serve_job(comm: MPI.Comm, cfg: Any) -> None:
    run_session(comm, cfg, _serve, prepare=lambda: bind(cfg.serve.host, cfg.serve.port),
                max_batch=cfg.serve.max_batch)


@main_guard
def main() -> None:
    from tpi_mpi import run

    run.main(serve_job)
    import gc
    gc.freeze()


if __name__ == "__main__":
    main()
