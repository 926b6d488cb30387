"""Entry point: `mpirun -n N python -m tpi_mpi.chat model.path=DIR [overrides]`: a chat in the terminal.

Rank 0 reads your lines (mpiexec passes the terminal's input to rank 0 only), puts the conversation through
the tokenizer's chat template and streams the reply. The history stays in the KV cache (the prompt cache),
so each turn prefills only what is new. `/reset` starts a new conversation; Ctrl-D (or `/quit`) ends it and
every rank exits; Ctrl-C stops the reply being written. Generation settings: generation.* (max_new_tokens,
do_sample, temperature, top_p, seed); serve.chat_stop adds stop strings.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, TextIO

from mpi4py import MPI

from tpi_mpi.errors import UserError, main_guard
from tpi_mpi.serving.host import model_name, run_session
from tpi_mpi.serving.scheduler import Cancelled, Delta, Request, Session

HELP = "/reset starts over, /quit or Ctrl-D ends, Ctrl-C stops a reply"
PROMPT = "> "


def _turn(session: Session, cfg: Any, history: list[dict[str, str]], out: TextIO, stop: threading.Event,
          turn: int) -> None:
    """One reply to the last user message; the history gets it (or loses that message if it failed)."""
    tok = session.tok
    ids = list(tok(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False).input_ids)
    if len(ids) >= session.context:
        history.pop()
        out.write(f"(the conversation has {len(ids)} tokens, the context {session.context}: /reset)\n")
        return
    g = cfg.generation
    parts: list[str] = []

    def emit(ev: Any) -> None:
        if isinstance(ev, Delta) and ev.text:
            parts.append(ev.text)
            out.write(ev.text)
            out.flush()

    def between_tokens() -> None:
        if stop.is_set():
            raise Cancelled

    req = Request(ids, g.max_new_tokens, emit, g.temperature if g.do_sample else 0.0, g.top_p, g.seed + turn,
                  tuple(cfg.serve.chat_stop), label="chat")
    stop.clear()
    try:
        result = session.generate(req, between_tokens)
        lat = result.token_latencies_s
        note = (f"[{result.completion_tokens} tokens, {result.cached_tokens}/{result.prompt_tokens} prompt "
                f"tokens cached, first token {result.ttft_s * 1e3:.0f} ms"
                + (f", then {sum(lat) / len(lat) * 1e3:.1f} ms/token]" if lat else "]"))
    except Cancelled:
        note = "[stopped]"
    out.write(f"\n{note}\n")
    history.append({"role": "assistant", "content": "".join(parts)})


def _chat(session: Session, cfg: Any, _: Any, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    if not getattr(session.tok, "chat_template", None):
        raise UserError("this model's tokenizer has no chat template: tpi_mpi.chat needs one")
    generating = threading.Event()
    stop = threading.Event()

    def interrupt(_signum: int, _frame: Any) -> None:  # mpiexec passes Ctrl-C on to every rank
        if generating.is_set():
            stop.set()  # the reply stops at the next token
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    out.write(f"tpi_mpi chat: {model_name(cfg)} on {session.master.comm.size} ranks, context {session.context} "
              f"tokens. {HELP}\n")
    history: list[dict[str, str]] = []
    turn = 0
    try:
        while True:
            out.write(PROMPT)
            out.flush()
            line = inp.readline()
            if not line or line.strip() in ("/quit", "/exit"):  # end of input: Ctrl-D
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                history.clear()
                out.write("(new conversation)\n")
                continue
            if text.startswith("/"):
                out.write(f"(unknown command {text}: {HELP})\n")
                continue
            history.append({"role": "user", "content": text})
            generating.set()
            try:
                _turn(session, cfg, history, out, stop, turn)
            finally:
                generating.clear()
            turn += 1
    except KeyboardInterrupt:
        pass
    out.write("\n")
    out.flush()


def chat_job(comm: MPI.Comm, cfg: Any) -> None:
    run_session(comm, cfg, _chat)


@main_guard
def main() -> None:
    from tpi_mpi import run

    run.main(chat_job)


if __name__ == "__main__":
    main()
