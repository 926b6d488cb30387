"""The steps of a job that every entry point shares: `run`, the baselines, `eval` and the server.

Splitting on first use, the memory plan, the tokenizer, starting every rank together, generating for one
prompt into a record, and reporting that record (summary line, JSON, JSONL, wandb).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from mpi4py import MPI

from tpi_mpi.errors import UserError, agree_or_abort
from tpi_mpi.faults import fail_point
from tpi_mpi.weights.formats import QuantSpec, make_spec


def set_threads(comm: MPI.Comm, threads: int | None) -> None:
    import torch

    if threads is None:
        # Ranks sharing a machine share its cores; more threads than cores makes every step far slower.
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).size
        threads = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)


def shard_dir(cfg: Any, world_size: int) -> Path:
    """model.shards if given; else a split of model.path for this world size under model.cache_dir."""
    if cfg.model.shards:
        return Path(cfg.model.shards)
    name = Path(cfg.model.path).resolve().name
    from tpi_mpi.weights.split import FORMAT

    # The format's version is in the name: a split cached by an older tpi_mpi is split again, not reused.
    tag = f"{name}-n{world_size}-{cfg.model.dtype}-v{FORMAT.rsplit('/', 1)[1]}"
    spec = make_spec(cfg.model.quant, cfg.model.group_size)
    if spec.quantized:  # a float split and a packed one of the same model live side by side
        tag += f"-{spec.label}"
        if spec.format == "int4" and cfg.model.kernel != "auto":  # the layout follows model.kernel
            tag += f"-{cfg.model.kernel}"
    if cfg.model.ratios:
        tag += "-r" + "_".join(f"{r:g}" for r in cfg.model.ratios)
    return Path(cfg.model.cache_dir) / re.sub(r"[^A-Za-z0-9_.=-]", "_", tag)


def prepare_shards(comm: MPI.Comm, cfg: Any, world_size: int | None = None) -> Path:
    """Rank 0 splits model.path into the cache on first use; the others wait without spinning.
    world_size: of the split (default: the ranks started; baseline=pipeline uses 1)."""
    from tpi_mpi.weights.split import rank_dir, split

    world_size = comm.size if world_size is None else world_size
    path = shard_dir(cfg, world_size)
    error = None
    if comm.rank == 0 and not cfg.model.shards and not rank_dir(path, 0).is_dir():
        if not cfg.model.path or not Path(cfg.model.path).is_dir():
            error = f"model.path={cfg.model.path} is not a directory: give a Hugging Face checkpoint"
        else:
            print(f"tpi_mpi: splitting {cfg.model.path} for {world_size} ranks into {path} ...",
                  file=sys.stderr, flush=True)
            try:
                split(cfg.model.path, path, world_size, list(cfg.model.ratios) if cfg.model.ratios else None,
                      "auto" if cfg.model.dtype == "auto" else cfg.model.dtype,
                      quant_format=cfg.model.quant, group_size=cfg.model.group_size, kernel=cfg.model.kernel)
            except UserError as exc:
                error = str(exc)
    wait_for_all(comm)
    agree_or_abort(comm, error)
    return path


def wait_for_all(comm: MPI.Comm) -> None:
    """A barrier that sleeps: a blocking one would spin every waiting rank on a shared core."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.01)


def start_together(comm: MPI.Comm) -> None:
    """Every rank loaded and waiting for the first prompt when rank 0 starts its clock. The sleeping barrier
    lets each rank go up to one poll (10 ms) after the last arrived, which the first prompt's latency would
    measure; the blocking barrier after it, which all ranks reach within that poll, they leave together."""
    wait_for_all(comm)
    comm.Barrier()


def memory_plan(comm: MPI.Comm, shard: Any, cfg: Any, max_batch: int = 1) -> Any:
    """Each rank plans its own memory (its shard, its overhead); a budget too small anywhere stops all.
    max_batch > 1: a KV cache slot per sequence, passes of at most serve.prefill_chunk + max_batch positions."""
    from tpi_mpi.engine import DTYPES
    from tpi_mpi.weights.memplan import plan_rank_memory

    fail_point("memplan", comm.rank)
    plan, error = None, None
    pass_tokens = cfg.serve.prefill_chunk + max_batch - 1 if max_batch > 1 else None
    try:
        plan = plan_rank_memory(shard, cfg.memory, DTYPES[cfg.model.dtype], comm.rank == 0, max_batch, pass_tokens)
    except UserError as exc:
        error = str(exc)
    agree_or_abort(comm, error)
    return plan


def _select_kernel(kind: str, spec: QuantSpec) -> str | None:
    """model.kernel on this rank (each rank builds or finds the kernel for its own CPU), for the split's format:
    None, or why it cannot run."""
    from tpi_mpi.models.linear import select_kernel

    try:  # float splits too: fp16 decoding has a kernel of its own
        select_kernel(kind, spec)
    except UserError as exc:
        return str(exc)
    return None


def open_engine(comm: MPI.Comm, cfg: Any, max_batch: int = 1) -> tuple[Any, Path]:
    """Every rank: the split (made on first use), its shard checked, its memory planned, and its engine: the
    Master on rank 0, a Worker elsewhere, with its streamed window filled. Returns (engine, split folder).
    max_batch: KV cache slots (serve.max_batch; tpi_mpi.run decodes one sequence)."""
    from tpi_mpi.engine import Master, Worker
    from tpi_mpi.weights.shards import open_rank_shard

    path = prepare_shards(comm, cfg)
    fail_point("shards", comm.rank)
    shard, error = None, None
    try:
        shard = open_rank_shard(path, comm.rank, comm.size, cfg.model.verify_checksums)
    except UserError as exc:
        error = str(exc)
    agree_or_abort(comm, error)
    assert shard is not None
    ids = comm.gather(shard.split_id, root=0)
    foreign = None
    if ids is not None and len(set(ids)) > 1:  # rank 0 only
        r = next(r for r, i in enumerate(ids) if i != ids[0])
        foreign = f"{path}/rank_{r} comes from another split than rank_0: split the model again"
    agree_or_abort(comm, foreign)
    agree_or_abort(comm, _select_kernel(cfg.model.kernel, shard.quant))
    plan = memory_plan(comm, shard, cfg, max_batch)
    links = None
    if cfg.emulation.links == "software":  # every allreduce message waits for its modelled delivery time
        from tpi_mpi.comm.links import SoftwareLinks

        links = SoftwareLinks(comm.rank, comm.size, cfg.network)
    cls = Master if comm.rank == 0 else Worker
    engine = cls(comm, shard, cfg.comm.algo, cfg.model.dtype, cfg.comm.dtype, cfg.comm.timeout_s, links, plan,
                 cfg.memory.head, max_batch)
    engine.blocks.wait_filled()  # streaming: the window filled before the first prompt, as between prompts
    return engine, path


def serve_until_stopped(comm: MPI.Comm, worker: Any) -> None:
    """A worker's whole job: start with the others, run the master's forward passes, then send its record."""
    start_together(comm)  # every rank loaded: from here a long wait in a collective is a stall
    worker.serve()
    worker.close()
    fail_point("record", comm.rank)
    comm.gather(worker.rank_record(), root=0)


def load_tokenizer(cfg: Any, shard_path: Path) -> Any:
    """Rank 0's tokenizer: from the split's rank_0 folder, else from model.path (None if neither has one)."""
    from transformers import AutoTokenizer

    for d in (shard_path / "rank_0", Path(cfg.model.path) if cfg.model.path else None):
        if d is not None and (d / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(str(d))
    return None


def generate_record(master: Any, cfg: Any, shard_path: Path, tok: Any) -> dict[str, Any]:
    """Generate for the configured prompt; `tok`: the tokenizer (None: prompt_ids are required)."""
    from tpi_mpi.generate import Sampler, generate

    g = cfg.generation
    if cfg.prompt_ids is not None:
        ids = list(cfg.prompt_ids)
    elif tok is None:
        raise UserError("no tokenizer found next to the shards or in model.path: give prompt_ids=[...]")
    else:
        ids = tok(cfg.prompt).input_ids
    eos = master.eos_token_id
    eos_ids = set() if not g.stop_on_eos or eos is None else set(eos if isinstance(eos, list) else [eos])
    sampler = Sampler(g.do_sample, g.temperature, g.top_k, g.top_p, g.seed)
    printed = [""]

    def stream(tokens: list[int]) -> None:
        if tok is None or not g.stream or cfg.logging.quiet:
            return
        text = tok.decode(tokens, skip_special_tokens=True)
        sys.stdout.write(text[len(printed[0]):])
        sys.stdout.flush()
        printed[0] = text

    if g.stream and not cfg.logging.quiet and tok is not None and cfg.prompt_ids is None:
        sys.stdout.write(cfg.prompt)
    gen = generate(master, ids, g.max_new_tokens, sampler, eos_ids, cfg.memory.kv_cache_tokens, stream)
    if printed[0] or (g.stream and not cfg.logging.quiet and tok is not None):
        sys.stdout.write("\n")
    lat = gen.token_latencies_s
    import numpy as np

    return {
        "prompt_tokens": gen.prompt_tokens,
        "generated_tokens": len(gen.tokens),
        "token_ids": gen.tokens,
        "text": tok.decode(gen.tokens, skip_special_tokens=True) if tok is not None else None,
        "ttft_s": gen.ttft_s,
        "token_latency_s": {
            "mean": float(np.mean(lat)) if lat else None,
            "p50": float(np.percentile(lat, 50)) if lat else None,
            "p90": float(np.percentile(lat, 90)) if lat else None,
        },
        "tokens_per_s": (len(lat) / sum(lat)) if lat else None,
        "world_size": master.comm.size,
        # format (none, int8, int4), group size, float dtype; the baselines have none of their own
        "weights": getattr(master, "weights_record", lambda: None)(),
        "comm_algo": cfg.comm.algo if cfg.baseline is None else None,
        "baseline": cfg.baseline,
        # "software": allreduce times are modelled (emulation.links=software); "shaped": real shaped links
        "links": cfg.emulation.links,
        "network": cfg.network.name if cfg.network else None,  # profile names; their figures are in `config`
        "device": cfg.device.name if cfg.device else None,
        "shards": str(shard_path),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm": _slurm_job(),
    }


def _slurm_job() -> dict[str, str] | None:
    """Which Slurm job (and array task) made this record, so that records collected in one file stay apart."""
    keys = ("job_id", "array_job_id", "array_task_id", "job_nodelist", "ntasks")
    job = {k: os.environ[f"SLURM_{k.upper()}"] for k in keys if f"SLURM_{k.upper()}" in os.environ}
    return job or None


def report(record: dict[str, Any], cfg: Any) -> None:
    from tpi_mpi.results import append_jsonl, write_json_atomic

    record["config"] = cfg.to_json()
    try:
        from hydra.core.hydra_config import HydraConfig

        record["hydra_output_dir"] = HydraConfig.get().runtime.output_dir
    except Exception:  # not under Hydra (tests calling job() directly)
        record["hydra_output_dir"] = None
    lat = record["token_latency_s"]
    ranks = record["ranks"]
    summary = (
        f"[tpi_mpi] N={record['world_size']} "
        + (f"baseline={record['baseline']}" if record.get("baseline") else f"algo={record['comm_algo']}")
        + (f" weights={record['weights']['label']}" if record.get("weights") else "")
        + f" prompt={record['prompt_tokens']} tok "
        f"generated={record['generated_tokens']} tok | TTFT {record['ttft_s'] * 1e3:.1f} ms | "
        + (f"token latency mean {lat['mean'] * 1e3:.1f} ms p50 {lat['p50'] * 1e3:.1f} ms "
           f"p90 {lat['p90'] * 1e3:.1f} ms | {record['tokens_per_s']:.2f} tok/s | " if lat["mean"] else "")
        + f"peak RSS max {max(r['peak_rss_bytes'] for r in ranks) / 2**20:.0f} MiB | "
        f"comm {sum(r['comm_s'] for r in ranks) / len(ranks) * 1e3:.1f} ms/rank"
    )
    print(summary, file=sys.stderr, flush=True)
    if cfg.output.json:
        write_json_atomic(cfg.output.json, record)
    if cfg.output.results:
        append_jsonl(cfg.output.results, record)
    if cfg.logging.wandb:
        _to_wandb(record, cfg)


def _to_wandb(record: dict[str, Any], cfg: Any) -> None:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.logging.wandb_project, group=cfg.logging.wandb_group,
                     mode=cfg.logging.wandb_mode, config=cfg.public().to_json())
    lat = record["token_latency_s"]
    run.summary.update({
        "ttft_s": record["ttft_s"], "token_latency_mean_s": lat["mean"], "token_latency_p50_s": lat["p50"],
        "token_latency_p90_s": lat["p90"], "tokens_per_s": record["tokens_per_s"],
        "generated_tokens": record["generated_tokens"], "world_size": record["world_size"],
        "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in record["ranks"]),
    })
    run.log({"ranks": wandb.Table(columns=list(record["ranks"][0])[:7],
                                  data=[list(r.values())[:7] for r in record["ranks"]])})
    run.finish()
