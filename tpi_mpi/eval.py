"""Held-out perplexity computed by the tensor-parallel engine itself, under any run configuration:

    mpirun -n 4 python -m tpi_mpi.eval model.path=checkpoints/shakespeare [any tpi_mpi.run override]

Every rank runs its slice of every layer over each window of the text (teacher forcing: the whole window in one
forward pass) and its vocabulary slice of the logits of every position (memory.head=split); rank 0 gathers
them and scores the next token. Token ids stay on rank 0 as in generation: workers see only hidden states.
The text and its windows are perplexity.py's (eval.* keys in conf/config.yaml); the figures go to stdout,
to the run record (output.json / output.results, with "kind": "eval") and to wandb with logging.wandb=true.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from mpi4py import MPI

from tpi_mpi.errors import UserError, agree_or_abort
from tpi_mpi.job import load_tokenizer, open_engine, serve_until_stopped, set_threads, start_together
from tpi_mpi.run import main

MAX_DEFAULT_WINDOW = 1024  # eval.window=null on a model with a longer context: the logits of a window stay small


def eval_job(comm: MPI.Comm, cfg: Any) -> None:
    set_threads(comm, cfg.threads)
    wrong = None
    if cfg.baseline is not None and comm.rank == 0:  # rank 0 says it, once
        wrong = f"tpi_mpi.eval scores with the tensor-parallel engine: set baseline=null (got {cfg.baseline})"
    agree_or_abort(comm, wrong)
    engine, path = open_engine(comm, cfg)
    if comm.rank != 0:
        serve_until_stopped(comm, engine)
        return
    master = engine
    from tpi_mpi.perplexity import score

    # Checked before the workers start serving: a UserError here takes every rank down (run_or_abort).
    text_path, ids, window, bos = _heldout(cfg, master, path)
    start_together(comm)
    try:
        t0 = time.perf_counter()
        s = score(lambda inputs: master.forward(inputs, 0, capacity=len(inputs), all_logits=True), ids, window,
                  bos)
        seconds = time.perf_counter() - t0
    finally:
        master.stop()  # also on error, so that the workers are not left waiting
    master.close()
    record = {
        "kind": "eval",
        "perplexity": s.perplexity,
        "tokens": s.tokens,
        "nll_nats": s.nll,
        "windows": s.windows,
        "window": window,
        "text": str(text_path),
        "text_sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
        "eval_s": seconds,
        "tokens_per_s": s.tokens / seconds,
        "world_size": comm.size,
        "comm_algo": cfg.comm.algo,
        "links": cfg.emulation.links,
        "network": cfg.network.name if cfg.network else None,
        "device": cfg.device.name if cfg.device else None,
        "shards": str(path),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record["ranks"] = comm.gather(master.rank_record(), root=0)
    _report(record, cfg)


def _heldout(cfg: Any, master: Any, shard_path: Path) -> tuple[Path, list[int], int, int]:
    """Rank 0: (text file, its token ids, window, <s> id), checked against the model."""
    e = cfg.eval
    tok = load_tokenizer(cfg, shard_path)
    if tok is None:
        raise UserError("no tokenizer found next to the shards or in model.path: tpi_mpi.eval needs one")
    if e.text is not None:
        text_path = Path(e.text)
        if not text_path.is_file():
            raise UserError(f"eval.text={e.text} is not a file: give a UTF-8 text file, or null for the "
                            "Shakespeare held-out split")
    else:
        from tpi_mpi.training.corpus import fetch

        text_path = fetch(e.corpus_dir, quiet=False).heldout
    try:
        text = text_path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"eval.text={text_path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    ids = tok(text, add_special_tokens=False).input_ids[:e.max_tokens]
    if not ids:
        raise UserError(f"{text_path} holds no tokens to score")
    bos = tok.bos_token_id
    if bos is None:
        raise UserError("the tokenizer has no bos_token: tpi_mpi.eval starts every window with it")
    window = e.window or min(master.max_positions, MAX_DEFAULT_WINDOW)
    if window > master.max_positions:
        raise UserError(f"eval.window={window} exceeds the model's {master.max_positions} positions: lower it")
    if max(ids) >= master.vocab_size:  # a tokenizer may know more tokens than its model has rows
        raise UserError(f"the text has token id {max(ids)}, outside the model's vocabulary of {master.vocab_size}")
    return text_path, ids, window, bos


def _report(record: dict[str, Any], cfg: Any) -> None:
    from tpi_mpi.results import append_jsonl, write_json_atomic

    record["config"] = cfg.to_json()
    try:
        from hydra.core.hydra_config import HydraConfig

        record["hydra_output_dir"] = HydraConfig.get().runtime.output_dir
    except Exception:  # not under Hydra
        record["hydra_output_dir"] = None
    ranks = record["ranks"]
    print(f"perplexity {record['perplexity']:.4f} over {record['tokens']} tokens ({record['windows']} windows of "
          f"{record['window']}, {Path(record['text']).name})", flush=True)
    print(f"[tpi_mpi.eval] N={record['world_size']} algo={record['comm_algo']} | {record['eval_s']:.1f} s, "
          f"{record['tokens_per_s']:,.0f} tok/s | peak RSS max {max(r['peak_rss_bytes'] for r in ranks) / 2**20:.0f} "
          f"MiB | comm {sum(r['comm_s'] for r in ranks) / len(ranks):.2f} s/rank", file=sys.stderr, flush=True)
    if cfg.output.json:
        write_json_atomic(cfg.output.json, record)
    if cfg.output.results:
        append_jsonl(cfg.output.results, record)
    if cfg.logging.wandb:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(project=cfg.logging.wandb_project, group=cfg.logging.wandb_group,
                         mode=cfg.logging.wandb_mode, job_type="eval", config=cfg.public().to_json())
        run.summary.update({k: record[k] for k in ("perplexity", "tokens", "windows", "window", "eval_s",
                                                   "world_size")})
        run.finish()


if __name__ == "__main__":
    main(eval_job)
