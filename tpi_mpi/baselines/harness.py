"""Which baseline a run starts: `baseline=transformers|accelerate|pipeline` in the same harness as tensor
parallelism.

Same prompt, same sampler, same timing (engine.generate) and the same run record; only what computes the
logits differs:
    transformers  Hugging Face transformers on one process, all weights in memory (mpirun -n 1)
    accelerate    HF Accelerate big-model inference on one process: device_map="auto" under
                  accelerate.max_memory, the layers that do not fit offloaded to disk (mpirun -n 1)
    pipeline      our pipeline parallelism over N ranks (tpi_mpi/baselines/pipeline.py)
The two HF baselines are one device by nature, so they refuse N > 1 instead of leaving ranks idle.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from mpi4py import MPI

from tpi_mpi.baselines.hf import HFRunner, load_hf
from tpi_mpi.errors import UserError, agree_or_abort


def baseline_job(comm: MPI.Comm, cfg: Any) -> None:
    """One run of cfg.baseline; rank 0 writes the record exactly as for tensor parallelism."""
    from tpi_mpi.job import generate_record, load_tokenizer, report

    if cfg.baseline == "pipeline":
        _pipeline_job(comm, cfg)
        return
    agree_or_abort(comm, None if comm.size == 1 else
                   f"baseline={cfg.baseline} runs on one process: start it with mpirun -n 1 "
                   f"(got {comm.size} ranks); baseline=pipeline uses several")
    offload_dir = None
    if cfg.baseline == "accelerate":
        Path(cfg.accelerate.offload_folder).mkdir(parents=True, exist_ok=True)
        offload_dir = Path(tempfile.mkdtemp(dir=cfg.accelerate.offload_folder, prefix="run-"))
    try:
        model, load_s = load_hf(cfg, offload_dir)
        runner = HFRunner(comm, model, load_s, cfg.baseline)
        record = generate_record(runner, cfg, Path(cfg.model.path), load_tokenizer(cfg, Path(cfg.model.path)))
    finally:
        if offload_dir is not None:  # what Accelerate offloaded is a copy of the checkpoint: remove it
            shutil.rmtree(offload_dir, ignore_errors=True)
    record["baseline"] = cfg.baseline
    record["ranks"] = [runner.rank_record()]
    if runner.device_map is not None:
        record["offloaded_modules"] = sorted(k for k, v in runner.device_map.items() if str(v) == "disk")
    report(record, cfg)


def check_model_dtype(shard: Any, dtype: str) -> None:
    from tpi_mpi.engine import DTYPES
    from tpi_mpi.weights import quant

    quant.check_model_dtype(shard.quant, DTYPES[dtype], shard.tensor_file(0, "attn").entries["input_norm.weight"]
                            .torch_dtype)


def _pipeline_job(comm: MPI.Comm, cfg: Any) -> None:
    from tpi_mpi.baselines.pipeline import PipelineMaster, PipelineWorker, layer_ranges
    from tpi_mpi.job import generate_record, load_tokenizer, prepare_shards, report, start_together
    from tpi_mpi.weights.shards import open_rank_shard

    path = prepare_shards(comm, cfg, world_size=1)  # whole layers; every rank reads only its own
    shard, error = None, None
    try:
        shard = open_rank_shard(path, 0, 1, cfg.model.verify_checksums)
        if shard.num_layers < comm.size:
            error = (f"baseline=pipeline needs at least one layer per rank: the model has "
                     f"{shard.num_layers} layers for {comm.size} ranks")
        check_model_dtype(shard, cfg.model.dtype)  # as tensor parallelism does (a quantized split stays packed)
    except UserError as exc:
        error = str(exc)
    agree_or_abort(comm, error)
    assert shard is not None
    if comm.rank != 0:
        worker = PipelineWorker(comm, shard, cfg.model.dtype)
        start_together(comm)  # the first prompt's latency then holds no rank's loading
        worker.serve()
        comm.gather(worker.rank_record(), root=0)
        return
    master = PipelineMaster(comm, shard, cfg.model.dtype)
    tok = load_tokenizer(cfg, path)
    start_together(comm)
    try:
        record = generate_record(master, cfg, path, tok)
    finally:
        master.stop()
    record["baseline"] = "pipeline"
    record["layer_ranges"] = [list(r) for r in layer_ranges(shard.num_layers, comm.size)]
    record["ranks"] = comm.gather(master.rank_record(), root=0)
    report(record, cfg)
