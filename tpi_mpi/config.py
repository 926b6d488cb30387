"""Typed, frozen run configuration, built from the Hydra config and validated in one place.

Every field is documented in conf/*.yaml and docs/configuration.md. Validation errors are UserErrors: one line.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from tpi_mpi.comm.allreduce import ALGORITHMS, WIRE_CHOICES
from tpi_mpi.emulate.profiles import DeviceProfile, NetworkProfile, device_from_dict, network_from_dict
from tpi_mpi.errors import UserError
from tpi_mpi.units import parse_size
from tpi_mpi.weights.formats import MODEL_KERNELS, make_spec

CHECKSUM_MODES = ("xxh3", "sha256", "none")  # model.verify_checksums, see shards.py
WEIGHT_DTYPES = ("auto", "fp32", "fp16", "bf16")
# baseline=...: run something else than tensor parallelism in the same harness (tpi_mpi/baselines/harness.py)
BASELINES = ("transformers", "accelerate", "pipeline")
# What MPICH 5 accepts for MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM (`mpivars` lists them).
MPICH_ALLREDUCE_ALGORITHMS = ("auto", "nb", "smp", "recursive_doubling", "recursive_multiplying",
                              "reduce_scatter_allgather", "tree", "recexch", "ring", "k_reduce_scatter_allgather")
MPICH_ALLREDUCE_ENV = "MPIR_CVAR_ALLREDUCE_INTRA_ALGORITHM"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    shards: str | None = None
    cache_dir: str = "shards"
    ratios: tuple[float, ...] | None = None
    dtype: str = "auto"
    verify_checksums: str = "xxh3"  # xxh3 (fast, default), sha256, none (sizes only)
    quant: str = "none"  # linear weights of automatic splits: none (float), int8, int4 (weights/quant.py)
    group_size: int | None = None  # int4 only: input columns per scale (32, 64, 128); null = quant's default
    kernel: str = "auto"  # int8 matmuls: auto (hand-written AVX2 kernel where it builds, else torch's), native, torch


@dataclass(frozen=True)
class CommConfig:
    algo: str = "star"
    # partial sums on the wire (fp32, fp16, bf16, int8) or auto (algo=auto picks the wire too, lossy ones
    # included: the user opts in); sums are taken in fp32
    dtype: str = "fp32"
    mpi_algorithm: str | None = None  # MPICH's own allreduce algorithm, for algo=mpi (set by mpirun -genv)
    timeout_s: float | None = 60.0  # watchdog: a collective stalled this long aborts the job; null/0 = off


@dataclass(frozen=True)
class MemoryConfig:
    resident: bool | str = True  # true: all in memory; false: stream every block; auto: as the budget allows
    window: int | None = None  # streamed blocks in memory at once (the one computing included); null = 2
    budget: str | int | None = None  # per rank, e.g. 1.5GB / 800MiB, or "cgroup" (its limit); resident=auto only
    kv_cache_tokens: int | None = None
    head: str = "split"  # lm_head: split by vocabulary over the ranks (rank 0 gathers logits), or all on the master

    @property
    def budget_bytes(self) -> int | None:
        """The budget in bytes; for budget=cgroup, the limit of this process's memory cgroup."""
        if self.budget == "cgroup":
            from tpi_mpi.weights.cgroup_memory import cgroup_memory_limit

            limit = cgroup_memory_limit()
            if limit is None:
                raise UserError("memory.budget=cgroup but this process is in no memory cgroup with a limit: "
                                "give the budget in bytes, e.g. memory.budget=1.5GB")
            return limit
        return None if self.budget is None else parse_bytes(self.budget)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_on_eos: bool = True
    stream: bool = True


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "tpi_mpi"
    wandb_group: str | None = None
    quiet: bool = False


@dataclass(frozen=True)
class AccelerateConfig:
    """baseline=accelerate only: HF Accelerate big-model inference with disk offload."""

    max_memory: str | int | None = None  # memory budget of the one device, e.g. "200MB"; null = no cap
    offload_folder: str = "offload"  # where Accelerate writes weights it offloads to disk


@dataclass(frozen=True)
class OutputConfig:
    json: str | None = None
    results: str | None = "results/results.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    """python -m tpi_mpi.eval only: held-out perplexity (tpi_mpi/perplexity.py says how the text is scored)."""

    text: str | None = None  # a UTF-8 text file; null = the Shakespeare held-out split (fetched on first use)
    corpus_dir: str | None = None  # where that split is cached; null = $TPI_MPI_CORPUS or data/shakespeare
    max_tokens: int | None = None  # score only the first N tokens of the text; null = all
    window: int | None = None  # positions per window, <s> included; null = the model's, at most 1024


@dataclass(frozen=True)
class ServeConfig:
    """`python -m tpi_mpi.serve` and `python -m tpi_mpi.chat` only (docs/serving.md)."""

    host: str = "127.0.0.1"  # where the HTTP server listens; 0.0.0.0 exposes it to the network
    port: int = 8000  # 0: any free port (the one taken is printed)
    api_key: str | None = None  # set: every request needs `Authorization: Bearer <key>` (else 401)
    model_name: str | None = None  # the model's id in the API; null: model.path's folder name
    queue_size: int = 16  # requests waiting behind the one generating; one more is answered 429
    max_body_bytes: int = 1_000_000  # larger request bodies are answered 413
    max_tokens: int = 256  # the most tokens a request may ask for, and what it gets when it does not say
    prompt_cache: bool = True  # keep the last conversation's KV cache; a request extending it prefills the rest
    heartbeat_s: float = 10.0  # idle: every rank is asked how it is this often (a stalled one ends the job); 0 off
    health_timeout_s: float = 2.0  # /health: a rank not answering within this is reported down (503)
    chat_stop: tuple[str, ...] = ()  # stop strings added to every chat request (e.g. a template's end of turn)
    max_batch: int = 1  # sequences decoded together, each in a KV cache slot of its own (the memory plan counts all)
    prefill_chunk: int = 256  # the most prompt tokens one forward pass prefills, between the batch's decode steps


LINK_MODES = ("none", "shaped", "software")


@dataclass(frozen=True)
class EmulationConfig:
    links: str = "none"  # none | shaped (set by `python -m tpi_mpi.emulate run`) | software (modelled here)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    comm: CommConfig
    memory: MemoryConfig
    generation: GenerationConfig
    logging: LoggingConfig
    output: OutputConfig
    accelerate: AccelerateConfig = AccelerateConfig()
    emulation: EmulationConfig = EmulationConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    # Hydra groups network=NAME / device=NAME (conf/network, conf/device): the modelled links of
    # emulation.links=software, otherwise labels of the record (caps and shaped links: tpi_mpi.emulate).
    network: NetworkProfile | None = None
    device: DeviceProfile | None = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    threads: int | None = None
    baseline: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["serve"]["api_key"] is not None:  # records and logs never carry the key
            d["serve"]["api_key"] = "<set>"
        return d

    def public(self) -> RunConfig:
        """What the workers may see: everything but the prompt (privacy: it never leaves rank 0) and the
        server's API key."""
        return RunConfig(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                            "prompt": None, "prompt_ids": None, "serve": replace(self.serve, api_key=None)})


def parse_bytes(value: str | int) -> int:
    """memory.budget: 1.5GB (decimal), 800MiB (binary), or a plain number of bytes."""
    return parse_size(value, "memory.budget", "1.5GB, 800MiB, 2000000000 or cgroup")


def _validate_memory(m: MemoryConfig) -> None:
    if m.head not in ("split", "master"):
        raise UserError(f"memory.head must be split or master, got {m.head!r}")
    if m.resident not in (True, False, "auto"):
        raise UserError(f"memory.resident must be true, false or auto, got {m.resident!r}")
    if m.kv_cache_tokens is not None and m.kv_cache_tokens < 1:
        raise UserError(f"memory.kv_cache_tokens must be positive or null, got {m.kv_cache_tokens}")
    if m.window is not None and (isinstance(m.window, bool) or not isinstance(m.window, int) or m.window < 1):
        raise UserError(f"memory.window must be a positive integer or null, got {m.window!r}")
    budget = None if m.budget == "cgroup" else m.budget_bytes  # a cgroup is the rank's own: checked there
    if budget is not None and budget <= 0:
        raise UserError(f"memory.budget must be positive, got {m.budget!r}")
    if m.resident is True and (m.window is not None or m.budget is not None):
        raise UserError("memory.resident=true keeps every block in memory: memory.window and memory.budget "
                        "apply only to resident=false (window) or resident=auto (budget): set them to null")
    if m.resident is False and m.budget is not None:
        raise UserError("memory.resident=false streams every block through memory.window buffers; to fit a "
                        "memory.budget (partly resident) use memory.resident=auto")
    if m.resident == "auto" and m.budget is None:
        raise UserError("memory.resident=auto needs memory.budget (e.g. memory.budget=1.5GB)")


# What each annotation accepts from the command line, and how the error names it.
_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"), "None": ((type(None),), "null"),
    "tuple[float, ...]": ((list, tuple), "a list of numbers"), "tuple[int, ...]": ((list, tuple), "a list of integers"),
    "tuple[str, ...]": ((list, tuple), "a list of strings"),
}


def _check_type(key: str, value: Any, annotation: str) -> None:
    """Hydra passes on what was typed (`threads=abc` gives a string): one line, not a TypeError later."""
    parts = [p.strip() for p in annotation.split("|")]
    if not all(p in _KINDS for p in parts):
        return  # a type this check does not know: validate() has the last word
    for p in parts:
        types = _KINDS[p][0]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            continue
        if isinstance(value, (list, tuple)):
            item = {"tuple[int, ...]": int, "tuple[str, ...]": str}.get(p, (int, float))
            if not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                continue
        return
    raise UserError(f"{key} must be {' or '.join(_KINDS[p][1] for p in parts)}, got {value!r}")


def _section(cls: type, data: dict[str, Any] | None, name: str) -> Any:
    data = dict(data or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key {name}.{unknown[0]}: known keys are {', '.join(sorted(known))}")
    if isinstance(data.get("verify_checksums"), bool):  # the older true/false
        data["verify_checksums"] = "sha256" if data["verify_checksums"] else "none"
    for f in fields(cls):
        if f.name in data:
            _check_type(f"{name}.{f.name}", data[f.name], str(f.type))
    if "ratios" in data and data["ratios"] is not None:
        data["ratios"] = tuple(float(r) for r in data["ratios"])
    if "chat_stop" in data:
        data["chat_stop"] = tuple(data["chat_stop"])
    return cls(**data)


def build_config(d: dict[str, Any]) -> RunConfig:
    """From a plain dict (OmegaConf.to_container of the Hydra config)."""
    d = {k: v for k, v in d.items() if k != "hydra"}
    top = {"prompt", "prompt_ids", "threads", "baseline", "network", "device"}
    sections = {"model": ModelConfig, "comm": CommConfig, "memory": MemoryConfig,
                "generation": GenerationConfig, "logging": LoggingConfig, "output": OutputConfig,
                "accelerate": AccelerateConfig,
                "emulation": EmulationConfig, "eval": EvalConfig, "serve": ServeConfig}
    unknown = sorted(set(d) - top - set(sections))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}: known are {', '.join(sorted(top | set(sections)))}")
    for key in top:
        if key in d:
            _check_type(key, d[key], str(next(f.type for f in fields(RunConfig) if f.name == key)))
    ids = d.get("prompt_ids")
    cfg = RunConfig(
        **{name: _section(cls, d.get(name), name) for name, cls in sections.items()},
        prompt=d.get("prompt"),
        prompt_ids=tuple(int(i) for i in ids) if ids is not None else None,
        threads=d.get("threads"),
        baseline=d.get("baseline"),
        network=network_from_dict("custom", d["network"]) if d.get("network") else None,
        device=device_from_dict("custom", d["device"]) if d.get("device") else None,
    )
    validate(cfg)
    return cfg


def _validate_comm(c: CommConfig, env: dict[str, str]) -> None:
    if c.algo not in ALGORITHMS:
        raise UserError(f"unknown comm.algo={c.algo!r}: choose one of {', '.join(ALGORITHMS)}")
    if c.dtype not in WIRE_CHOICES:
        raise UserError(f"unknown comm.dtype={c.dtype!r}: choose one of {', '.join(WIRE_CHOICES)}")
    if c.dtype == "auto" and c.algo != "auto":
        raise UserError(f"comm.dtype=auto lets comm.algo=auto choose the wire, got comm.algo={c.algo}: set "
                        "comm.algo=auto or a fixed comm.dtype (fp32, fp16, bf16, int8)")
    if c.algo == "mpi" and c.dtype != "fp32":
        raise UserError(f"comm.algo=mpi sums fp32 only, got comm.dtype={c.dtype}: set comm.dtype=fp32 or "
                        "another comm.algo")
    if c.timeout_s is not None and not c.timeout_s >= 0:
        raise UserError(f"comm.timeout_s must be >= 0 seconds (0 or null: no watchdog), got {c.timeout_s}")
    if c.mpi_algorithm is None:
        return
    if c.algo != "mpi":
        raise UserError(f"comm.mpi_algorithm applies to comm.algo=mpi only (got comm.algo={c.algo}): "
                        "set comm.mpi_algorithm=null")
    if c.mpi_algorithm not in MPICH_ALLREDUCE_ALGORITHMS:
        raise UserError(f"unknown comm.mpi_algorithm={c.mpi_algorithm!r}: choose one of "
                        f"{', '.join(MPICH_ALLREDUCE_ALGORITHMS)}")
    # MPICH reads its variables in MPI_Init, which mpi4py calls on import, before any config is read:
    # the algorithm can only come from mpirun's environment, so the config only checks it got there.
    if env.get(MPICH_ALLREDUCE_ENV, "auto") != c.mpi_algorithm:
        raise UserError(f"comm.mpi_algorithm={c.mpi_algorithm} must reach MPICH before it starts: run "
                        f"mpirun -genv {MPICH_ALLREDUCE_ENV} {c.mpi_algorithm} ... (it has "
                        f"{env.get(MPICH_ALLREDUCE_ENV, 'nothing')})")


def _validate_emulation(cfg: RunConfig) -> None:
    e = cfg.emulation
    if e.links not in LINK_MODES:
        raise UserError(f"unknown emulation.links={e.links!r}: choose one of {', '.join(LINK_MODES)}")
    if e.links != "software":
        return
    if cfg.network is None:
        raise UserError("emulation.links=software models the links of a network profile: add "
                        "network=wifi (or ethernet, 4g, paper: conf/network/*.yaml)")
    if cfg.comm.algo == "mpi":
        raise UserError("emulation.links=software cannot see inside MPI_Allreduce (comm.algo=mpi): choose "
                        "comm.algo=star, ring, mesh, tree or auto")


def validate(cfg: RunConfig, env: dict[str, str] | None = None) -> None:
    """`env`: the environment mpirun gave us (default: os.environ), to check comm.mpi_algorithm."""
    g = cfg.generation
    _validate_comm(cfg.comm, env if env is not None else dict(os.environ))
    if cfg.model.verify_checksums not in CHECKSUM_MODES:
        raise UserError(f"unknown model.verify_checksums={cfg.model.verify_checksums!r}: choose one of "
                        f"{', '.join(CHECKSUM_MODES)}")
    _validate_emulation(cfg)
    if cfg.model.dtype not in WEIGHT_DTYPES:
        raise UserError(f"unknown model.dtype={cfg.model.dtype!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
    make_spec(cfg.model.quant, cfg.model.group_size)  # unknown format or group size: one line
    if cfg.model.kernel not in MODEL_KERNELS:
        raise UserError(f"unknown model.kernel={cfg.model.kernel!r}: choose one of {', '.join(MODEL_KERNELS)}")
    if cfg.model.path is None and cfg.model.shards is None:
        raise UserError("no model: set model.path=HF_CHECKPOINT_DIR and/or model.shards=SPLIT_DIR")
    _validate_memory(cfg.memory)
    if g.max_new_tokens < 0:
        raise UserError(f"generation.max_new_tokens must be >= 0, got {g.max_new_tokens}")
    if g.do_sample and g.temperature <= 0:
        raise UserError(f"generation.temperature must be > 0 when sampling, got {g.temperature}")
    if g.top_k < 0:
        raise UserError(f"generation.top_k must be >= 0 (0 = off), got {g.top_k}")
    if not 0 < g.top_p <= 1:
        raise UserError(f"generation.top_p must be in (0, 1], got {g.top_p}")
    if cfg.prompt is None and cfg.prompt_ids is None:
        raise UserError('no prompt: set prompt="..." or prompt_ids=[1,2,3]')
    if cfg.prompt_ids is not None and len(cfg.prompt_ids) == 0:
        raise UserError("prompt_ids is empty: give at least one token id")
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"threads must be >= 1 or null (auto), got {cfg.threads}")
    if cfg.baseline is not None and cfg.baseline not in BASELINES:
        raise UserError(f"unknown baseline={cfg.baseline!r}: choose one of {', '.join(BASELINES)} or null "
                        "(tensor parallelism)")
    if cfg.baseline == "pipeline" and cfg.model.ratios is not None:
        raise UserError("baseline=pipeline splits whole layers evenly: set model.ratios=null")
    if cfg.accelerate.max_memory is not None:
        size_bytes(cfg.accelerate.max_memory, "accelerate.max_memory")
    for key in ("max_tokens", "window"):
        value = getattr(cfg.eval, key)
        if value is not None and value < 1:
            raise UserError(f"eval.{key} must be a positive integer or null, got {value}")
    _validate_serve(cfg.serve)
    if cfg.logging.wandb_mode not in ("offline", "online", "disabled"):
        raise UserError(f"logging.wandb_mode must be offline, online or disabled, got {cfg.logging.wandb_mode!r}")


def _validate_serve(s: ServeConfig) -> None:
    if not 0 <= s.port <= 65535:
        raise UserError(f"serve.port must be in 0..65535 (0: any free port), got {s.port}")
    if not s.host:
        raise UserError("serve.host is empty: give an address, e.g. 127.0.0.1")
    if s.api_key is not None and not s.api_key.strip():
        raise UserError("serve.api_key is empty: give a key or null (no key)")
    if s.queue_size < 0:
        raise UserError(f"serve.queue_size must be >= 0, got {s.queue_size}")
    if s.max_body_bytes < 1:
        raise UserError(f"serve.max_body_bytes must be >= 1, got {s.max_body_bytes}")
    if s.max_tokens < 1:
        raise UserError(f"serve.max_tokens must be >= 1, got {s.max_tokens}")
    if s.heartbeat_s < 0:
        raise UserError(f"serve.heartbeat_s must be >= 0 seconds (0: off), got {s.heartbeat_s}")
    if not s.health_timeout_s > 0:
        raise UserError(f"serve.health_timeout_s must be > 0 seconds, got {s.health_timeout_s}")
    if s.max_batch < 1:
        raise UserError(f"serve.max_batch must be >= 1 (sequences decoded together), got {s.max_batch}")
    if s.prefill_chunk < 1:
        raise UserError(f"serve.prefill_chunk must be >= 1 (prompt tokens per forward pass), got {s.prefill_chunk}")
    if any(not stop for stop in s.chat_stop):
        raise UserError("serve.chat_stop has an empty string: every stop string needs a character")


def size_bytes(text: str | int, key: str) -> int:
    """A positive memory size: '200MB', '1.5GB', '512MiB' or a plain number of bytes."""
    n = parse_size(text, key, "200MB, 1.5GB or 512MiB")
    if n <= 0:
        raise UserError(f"{key}={text!r} is not a memory size: give a positive size, e.g. 200MB")
    return n
