"""The Hugging Face baselines: `baseline=transformers` and `baseline=accelerate` on one process.

HFRunner puts an HF model behind the Master interface, so engine.generate times it exactly as tensor
parallelism; load_hf loads the checkpoint (under Accelerate: device_map="auto" within
accelerate.max_memory, the rest offloaded to disk). Which baseline runs is chosen in harness.py.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from mpi4py import MPI

from tpi_mpi.engine import Master
from tpi_mpi.errors import UserError

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

    from tpi_mpi.config import size_bytes

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
