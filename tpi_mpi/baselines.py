"""Baselines in the same harness as tensor parallelism: `baseline=transformers|accelerate|pipeline`.

Same prompt, same sampler, same timing (engine.generate) and the same run record; only what computes the
logits differs:
    transformers  Hugging Face transformers on one process, all weights in memory (mpirun -n 1)
    accelerate    HF Accelerate big-model inference on one process: device_map="auto" under
                  accelerate.max_memory, the layers that do not fit offloaded to disk (mpirun -n 1)
    pipeline      our pipeline parallelism over N ranks (tpi_mpi/pipeline.py)
The two HF baselines are one device by nature, so they refuse N > 1 instead of leaving ranks idle.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mpi4py import MPI

from .engine import Master
from .errors import UserError, agree_or_abort

TORCH_DTYPES: dict[str, Any] = {"auto": "auto", "fp32": torch.float32, "fp16": torch.float16,
                                "bf16": torch.bfloat16}


class HFRunner:
    """Greedy/sampled generation with a Hugging Face model behind the interface generate() uses."""

    def __init__(self, comm: MPI.Comm, model: Any, load_s: float, name: str):
        self.comm = comm
        self.model = model
        self.name = name
        cfg = model.config
        self.eos_token_id = cfg.eos_token_id
        self.max_positions = cfg.max_position_embeddings
        self.vocab_size = cfg.vocab_size
        self.cache: Any = None
        self.load_s = load_s
        self.compute_s = 0.0
        # Where Accelerate put each module: "cpu" in memory, "disk" offloaded (None: all in memory)
        self.device_map: dict[str, Any] | None = getattr(model, "hf_device_map", None)

    check_prompt = Master.check_prompt  # same checks, same messages

    @torch.inference_mode()
    def forward(self, ids: list[int], start: int, capacity: int = 0) -> torch.Tensor:
        t0 = time.perf_counter()
        if start == 0:
            self.cache = None
        out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True)
        self.cache = out.cache
        logits = out.logits[0, -1].float()
        self.compute_s += time.perf_counter() - t0
        return logits

    def stop(self) -> None:
        pass

    def rank_record(self) -> dict[str, Any]:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        record: dict[str, Any] = {"rank": 0, "peak_rss_bytes": rss, "load_s": self.load_s,
                                  "compute_s": self.compute_s, "comm_s": 0.0, "bytes_sent": 0, "bytes_received": 0}
        if self.device_map is not None:
            record["device_map"] = {k: str(v) for k, v in self.device_map.items()}
        return record


def load_hf(cfg: Any, offload_dir: Path | None) -> tuple[Any, float]:
    from transformers import AutoModelForCausalLM

    from .config import size_bytes

    if not cfg.model.path or not (Path(cfg.model.path) / "config.json").is_file():
        raise UserError(f"baseline={cfg.baseline} needs model.path=HF_CHECKPOINT_DIR (got {cfg.model.path})")
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"dtype": TORCH_DTYPES[cfg.model.dtype]}
    if offload_dir is not None:
        kw["device_map"] = "auto"
        kw["offload_folder"] = str(offload_dir)
        if cfg.accelerate.max_memory is not None:
            kw["max_memory"] = {"cpu": size_bytes(cfg.accelerate.max_memory, "accelerate.max_memory")}
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, **kw).eval()
    return model, time.perf_counter() - t0


def baseline_job(comm: MPI.Comm, cfg: Any) -> None:
    """One run of cfg.baseline; rank 0 writes the record exactly as for tensor parallelism."""
    from .run import _generate, _report, load_tokenizer

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
        record = _generate(runner, cfg, Path(cfg.model.path), load_tokenizer(cfg, Path(cfg.model.path)))
    finally:
        if offload_dir is not None:  # what Accelerate offloaded is a copy of the checkpoint: remove it
            shutil.rmtree(offload_dir, ignore_errors=True)
    record["baseline"] = cfg.baseline
    record["ranks"] = [runner.rank_record()]
    if runner.device_map is not None:
        record["offloaded_modules"] = sorted(k for k, v in runner.device_map.items() if str(v) == "disk")
    _report(record, cfg)


def _pipeline_job(comm: MPI.Comm, cfg: Any) -> None:
    from .pipeline import PipelineMaster, PipelineWorker, layer_ranges
    from .run import _generate, _report, load_tokenizer, prepare_shards, start_together
    from .shards import open_rank_shard

    path = prepare_shards(comm, cfg, world_size=1)  # whole layers; every rank reads only its own
    shard, error = None, None
    try:
        shard = open_rank_shard(path, 0, 1, cfg.model.verify_checksums)
        if shard.num_layers < comm.size:
            error = (f"baseline=pipeline needs at least one layer per rank: the model has "
                     f"{shard.num_layers} layers for {comm.size} ranks")
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
        record = _generate(master, cfg, path, tok)
    finally:
        master.stop()
    record["baseline"] = "pipeline"
    record["layer_ranges"] = [list(r) for r in layer_ranges(shard.num_layers, comm.size)]
    record["ranks"] = comm.gather(master.rank_record(), root=0)
    _report(record, cfg)
