"""Measurements of this machine that calibrate the model: compute, fixed costs per pass, disk, mpirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tpi_mpi.perf.shapes import FP32, FixedCost

ALGOS = ("star", "ring", "mesh", "tree", "mpi")
PROBE_HIDDEN = 128  # hidden size of the fixed-cost probe's models: its layers cost next to nothing


def median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_compute(threads: int) -> dict[str, float]:
    """With `threads` torch threads: FLOP/s of our decoder layers' prefill (16 tokens), bytes/s of weights
    through matrix-vector products (decode), and the fixed cost of one decoder layer (tiny shapes)."""
    import torch

    torch.set_num_threads(threads)
    h, f, q = 2048, 5504, 16
    ws = [torch.randn(f, h) for _ in range(4)]  # 4 x 45 MB: weights come from memory, not cache
    v = torch.randn(1, h)
    t = median_time(lambda: [torch.nn.functional.linear(v, m) for m in ws], 15)
    weight_bw = 4 * f * h * FP32 / t
    overhead = median_time(_layer_forward(64, 128, 4, 4, 16, distinct=1, q=1), 200)
    # Prefill: whole layers (norms, RoPE, attention and SiLU with the products), a 4-way slice of a
    # 2048-wide layer (46 MB), 8 distinct ones in turn as in a forward pass: one layer's weights alone would
    # stay in this host's L3 cache (260 MB here) and run ~15 % faster than a forward pass does.
    layer_s = median_time(_layer_forward(h, f // 4, 4, 2, 128, distinct=8, q=q), 24)
    params = h * (4 + 2 + 2 + 4) * 128 + 3 * h * f // 4
    flops = 2 * q * params / max(layer_s - overhead, 1e-9)
    return {"flops": flops, "weight_bw": weight_bw, "layer_overhead_s": overhead}


def _layer_forward(h: int, f: int, heads: int, kv_heads: int, head_dim: int, distinct: int, q: int) -> Any:
    """A function running one decoder layer (ShardedLayer: attention then FFN) on q tokens, each call the
    next of `distinct` layers of these shapes (random weights)."""
    import torch

    from tpi_mpi.models.decoder_config import DecoderConfig, Rope
    from tpi_mpi.models.llama import ShardedLayer

    def block() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        attn = {"input_norm.weight": torch.ones(h), "q_proj.weight": torch.randn(heads * head_dim, h),
                "k_proj.weight": torch.randn(kv_heads * head_dim, h),
                "v_proj.weight": torch.randn(kv_heads * head_dim, h),
                "o_proj.weight": torch.randn(h, heads * head_dim)}
        ffn = {"post_norm.weight": torch.ones(h), "gate_proj.weight": torch.randn(f, h),
               "up_proj.weight": torch.randn(f, h), "down_proj.weight": torch.randn(h, f)}
        return attn, ffn

    blocks = [block() for _ in range(distinct)]
    cfg = DecoderConfig.of({"model_type": "llama", "hidden_size": heads * head_dim, "intermediate_size": f,
                     "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": 1,
                     "vocab_size": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}, None)
    layer = ShardedLayer(n_heads=heads, n_kv=kv_heads, head_dim=head_dim, eps=1e-5, window=None,
                         dtype=torch.float32)
    layer.reset_cache(64)  # every call writes the same positions: no reset needed inside the timed call
    xs = torch.randn(q, h)
    start = 0 if q > 1 else 3
    cos, sin = Rope(cfg)(xs, torch.arange(start, start + q)[None])
    turn = [0]

    def run() -> None:
        attn, ffn = blocks[turn[0] % distinct]
        turn[0] += 1
        with torch.inference_mode():
            y = xs + layer.attention(attn, xs, start, cos, sin)
            y + layer.ffn(ffn, y)

    return run


def measure_overheads(workdir: Path, tokens: int = 24) -> dict[str, float]:
    """Fixed costs of a forward pass and of each layer, for our decoder and for HF transformers: decode
    latency of the real code on one process (one thread) with 1 and with 4 layers of negligible size
    (hidden 64); the difference over 3 layers is the per-layer cost, the rest the per-forward cost."""
    import torch
    from mpi4py import MPI
    from transformers import AutoModelForCausalLM

    from tpi_mpi.baselines.hf import HFRunner
    from tpi_mpi.engine import Master
    from tpi_mpi.make_model import make_model
    from tpi_mpi.weights.shards import open_rank_shard
    from tpi_mpi.weights.split import split

    torch.set_num_threads(1)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
    decode: dict[str, dict[int, float]] = {"ours": {}, "hf": {}}
    for layers in (1, 4):
        model = make_model(workdir / f"m{layers}", "tiny", "llama", layers=layers, overrides=shape)
        shard = open_rank_shard(split(model, workdir / f"s{layers}", 1), 0, 1)
        runners: dict[str, Any] = {"ours": Master(MPI.COMM_SELF, shard, "star"),
                   "hf": HFRunner(MPI.COMM_SELF, AutoModelForCausalLM.from_pretrained(model).eval(), 0.0, "hf")}
        for name, r in runners.items():
            times = []
            r.forward([1, 2, 3, 4], 0, 4 + tokens)
            for i in range(tokens):
                t0 = time.perf_counter()
                r.forward([5], 4 + i)
                times.append(time.perf_counter() - t0)
            decode[name][layers] = sorted(times)[len(times) // 2]
    out = {}
    for name, t in decode.items():
        per_layer = max(0.0, (t[4] - t[1]) / 3)
        out[f"{name}_layer_overhead_s"] = per_layer
        out[f"{name}_forward_overhead_s"] = max(0.0, t[1] - per_layer)
    return out


def measure_disk(size: int = 256 << 20) -> tuple[float, float]:
    """Bytes/s reading a fresh file whose pages were evicted from the page cache (our own file only), and
    reading it again from the page cache."""
    with tempfile.NamedTemporaryFile(dir=".", prefix=".perfmodel-disk-") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        speeds = []
        for _ in range(2):  # cold, then warm
            t0 = time.perf_counter()
            with open(f.name, "rb", buffering=0) as r:
                while r.read(1 << 24):
                    pass
            speeds.append(size / (time.perf_counter() - t0))
        return speeds[0], speeds[1]


def launcher(mpirun: str | list[str]) -> list[str]:
    """The mpirun command and its own options (e.g. ["mpirun", "-bind-to", "core"])."""
    return [mpirun] if isinstance(mpirun, str) else list(mpirun)


def bound_mpirun(mpirun: str, bind_to: str) -> list[str]:
    """mpirun with `-bind-to BIND_TO` (MPICH's Hydra), or without it for "none"."""
    return [mpirun, *(["-bind-to", bind_to] if bind_to != "none" else [])]


def run_mpirun(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run one mpirun in its own process group; on timeout kill the group (mpirun and every rank), then raise."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ...") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def measure_disk_readers(readers: tuple[int, ...] = (1, 2, 4, 8), size: int = 256 << 20) -> dict[int, float]:
    """Aggregate bytes/s of k threads reading at once, each its own cold file (evicted with POSIX_FADV_DONTNEED,
    our own files only): the streamed layers of N ranks are read by N processes at once from one disk. The
    same bytes in all: max(readers) files of size / max(readers); k readers share them out."""
    files = max(readers)
    chunk = size // files
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory(dir=".", prefix=".perfmodel-disk-") as d:
        paths = [Path(d) / f"f{i}" for i in range(files)]
        block = os.urandom(1 << 20)
        for path in paths:
            with open(path, "wb") as f:
                for _ in range(max(1, chunk >> 20)):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())

        def evict() -> None:
            for path in paths:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

        def read(mine: list[Path]) -> None:
            for path in mine:
                with open(path, "rb", buffering=0) as r:
                    while r.read(1 << 22):
                        pass

        import threading

        total = sum(p.stat().st_size for p in paths)
        for k in readers:
            evict()
            threads = [threading.Thread(target=read, args=(paths[i::k],)) for i in range(k)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[k] = total / (time.perf_counter() - t0)
    return out


def measure_fixed_costs(mpirun: str | list[str], workdir: Path, world_sizes: tuple[int, ...] = (1, 2, 4, 8),
                        layers: tuple[int, int] = (1, 4), repeats: int = 7, prompt_tokens: int = 16,
                        new_tokens: int = 16, timeout: float = 300) -> dict[str, Any]:
    """Real runs (`mpirun -n N python -m tpi_mpi.run`, one torch thread per rank, as the sweeps) of models of
    negligible size (hidden 128, 8 KV heads) with two layer counts: at N = 1 our decoder, HF transformers and
    Accelerate (everything offloaded), at N > 1 every allreduce algorithm. Returns the median TTFT and token
    latency p50 per world size, implementation and layer count."""
    from tpi_mpi.make_model import make_model

    shape = {"hidden_size": PROBE_HIDDEN, "intermediate_size": 2 * PROBE_HIDDEN, "num_attention_heads": 8,
             "num_key_value_heads": 8}
    models = [make_model(workdir / f"fixed-l{n}", "tiny", "llama", layers=n, overrides=shape) for n in layers]
    ids = ",".join(str(3 + i) for i in range(prompt_tokens))
    raw: dict[str, Any] = {}
    for n in world_sizes:
        results = workdir / f"fixed-n{n}.jsonl"
        sweep = (["baseline=null,transformers,accelerate", "accelerate.max_memory=1KB",
                  f"accelerate.offload_folder={workdir / 'offload'}"] if n == 1 else [f"comm={','.join(ALGOS)}"])
        runs = [(models, sweep)]
        if 1 < n <= layers[-1]:  # baseline=pipeline needs a layer per rank: the deeper model only
            runs.append((models[-1:], ["baseline=pipeline"]))
        print(f"calibrating fixed costs: {n} rank(s) ...", file=sys.stderr, flush=True)
        for k, (run_models, run_sweep) in enumerate(runs):
            cmd = [*launcher(mpirun), "-n", str(n), sys.executable, "-m", "tpi_mpi.run", "-m",
                   f"model.path={','.join(str(m) for m in run_models)}", f"model.cache_dir={workdir / 'shards'}",
                   f"prompt_ids=[{ids}]", f"generation.max_new_tokens={new_tokens}", "generation.stop_on_eos=false",
                   "logging.quiet=true", f"output.results={results}", "output.json=null", "threads=1",
                   *run_sweep, f"generation.seed={','.join(str(i + 1) for i in range(repeats))}",
                   f"hydra.sweep.dir={workdir / f'hydra-n{n}-{k}'}"]
            out = run_mpirun(cmd, timeout)
            if out.returncode != 0 or not results.is_file():
                raise RuntimeError(f"fixed-cost runs on {n} ranks failed:\n{out.stderr[-2000:]}")
        from tpi_mpi.results import read_jsonl

        points: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in read_jsonl(results):
            key = r.get("baseline") or f"tp:{r['comm_algo']}"
            n_layers = json.loads((Path(r["config"]["model"]["path"]) / "config.json").read_text())["num_hidden_layers"]
            points.setdefault((key, n_layers), []).append(r)
        per_n: dict[str, Any] = {}
        for (key, n_layers), recs in sorted(points.items()):
            ttft = sorted(r["ttft_s"] for r in recs)
            tok = sorted(r["token_latency_s"]["p50"] for r in recs)
            per_n.setdefault(key, {})[str(n_layers)] = {"ttft_s": ttft[len(ttft) // 2],
                                                        "token_s": tok[len(tok) // 2]}
        raw[str(n)] = per_n
    return {"probe_hidden": PROBE_HIDDEN, "prompt_tokens": prompt_tokens, "raw": raw}


def fit_fixed_costs(measured: dict[str, Any]) -> dict[int, dict[str, FixedCost]]:
    """Per layer = the difference between the two layer counts over the layers added; per pass = the rest
    (both at least 0: noise can make the difference negative). baseline=pipeline, measured with one layer
    count: its layers cost what our decoder's do on one process, its pass (N stages' own pass costs and the
    N hops) the rest."""
    out: dict[int, dict[str, FixedCost]] = {}
    pipeline: dict[int, tuple[int, dict[str, float]]] = {}
    for n, per_key in measured["raw"].items():
        for key, by_layers in per_key.items():
            if key == "pipeline":
                pipeline[int(n)] = next((int(k), v) for k, v in by_layers.items())
                continue
            (l1, t1), (l2, t2) = sorted((int(k), v) for k, v in by_layers.items())[:2]
            layer_tok = max(0.0, (t2["token_s"] - t1["token_s"]) / (l2 - l1))
            layer_pre = max(0.0, (t2["ttft_s"] - t1["ttft_s"]) / (l2 - l1))
            out.setdefault(int(n), {})[key] = FixedCost(
                pass_token_s=max(0.0, t1["token_s"] - l1 * layer_tok), layer_token_s=layer_tok,
                pass_prefill_s=max(0.0, t1["ttft_s"] - l1 * layer_pre), layer_prefill_s=layer_pre,
                probe_hidden=int(measured.get("probe_hidden", PROBE_HIDDEN)))
    one = out.get(1, {}).get("tp:star")
    for n, (layers, t) in pipeline.items():
        if one is not None:
            out.setdefault(n, {})["pipeline"] = FixedCost(
                pass_token_s=max(0.0, t["token_s"] - layers * one.layer_token_s), layer_token_s=one.layer_token_s,
                pass_prefill_s=max(0.0, t["ttft_s"] - layers * one.layer_prefill_s),
                layer_prefill_s=one.layer_prefill_s, probe_hidden=one.probe_hidden)
    return out


