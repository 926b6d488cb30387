"""Decoding side by side with llama.cpp on this machine: the same checkpoint, the same threads, interleaved runs.

    nice -n 10 python -m tpi_mpi.bench.llamacpp --llama-cpp DIR [--formats fp32,fp16,int8,int4-g64]
        [--world-sizes 1,2] [--preset llama2-7b] [--layers 4] [--prompt-tokens 16] [--new-tokens 16]
        [--repeats 3] [--workdir bench_out/tp_latency]

DIR is a llama.cpp source tree with llama-bench and llama-quantize built in DIR/build/bin (or --bin). No hub
is needed: llama.cpp's source comes from PyPI as the sdist of llama-cpp-python (docs/quantization.md says how to
build it). bench.tp_latency's random-weight checkpoint (fp32, the preset's real shapes) is written as a GGUF
file with the gguf package of that tree (DIR/gguf-py; q and k permuted as llama.cpp's converter does), and
llama-quantize --pure makes the others from it, every matrix in the one type (the default would keep the
output matrix at a higher precision, which reads more bytes than ours). Format pairs:
    fp32 ~ F32, fp16 ~ F16, int8 ~ Q8_0 (ours: one scale per row, 1.0 byte a weight; Q8_0 1.06),
    int4-g64 ~ Q4_0 (both 0.5625 bytes a weight: ours a bf16 scale and zero per 64, Q4_0 an fp16 scale per 32)
For each repeat, every format in turn: llama-bench's two tests, each its own run (-t cores -r 1, its warm-up
on; a test that crashes is reported as such and leaves the other), then one tpi_mpi run per world size (as
bench.formats runs them). Columns (medians over repeats): token ms (llama.cpp:
its tg test, decoding from an empty context; ours: the later tokens after the prompt), prefill ms (llama.cpp:
its pp test; ours: TTFT, which adds the first token), MB/token (weight bytes a decoding step reads, all ranks),
and the bound (those bytes / the read bandwidth measured in this run, as bench.formats). The GGUF files (WORKDIR/gguf)
are removed at the end unless --keep-gguf; the checkpoint and the splits stay, as bench.formats keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tpi_mpi.bench.formats import ensure_format_split, read_bandwidths, token_bytes
from tpi_mpi.bench.tp_latency import cores, ensure_checkpoint, prompt_ids, run_tpi
from tpi_mpi.errors import UserError, main_guard

GGUF_TYPES = {"fp32": "F32", "fp16": "F16", "int8": "Q8_0", "int4-g64": "Q4_0"}
HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    """llama.cpp's name of an HF Llama tensor (model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    parts = hf.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in HF_TO_GGUF:
        raise UserError(f"{hf}: not a tensor of a Llama checkpoint this bench converts")
    return f"blk.{parts[2]}.{HF_TO_GGUF['.'.join(parts[3:-1])]}.{parts[-1]}"


def permute_rope(w: Any, heads: int) -> Any:
    """q/k rows from HF's rotate-half order to llama.cpp's interleaved pairs (as its convert_hf_to_gguf.py)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def import_gguf(gguf_py: Path) -> Any:
    """The gguf package of the llama.cpp tree (its gguf-py folder), which this benchmark's GGUF files match."""
    if str(gguf_py) not in sys.path:
        sys.path.insert(0, str(gguf_py))
    import gguf

    return gguf


def write_f32_gguf(model: Path, out: Path, gguf_py: Path) -> None:
    """The HF checkpoint `model` (fp32 Llama) as an F32 GGUF file, with a made-up SentencePiece vocabulary of its
    vocabulary size (the bench feeds token ids, never text). Written to a temporary name, renamed when complete."""
    gguf = import_gguf(gguf_py)
    from safetensors import safe_open

    cfg = json.loads((model / "config.json").read_text())
    heads, kv, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_rope_freq_base(float(cfg.get("rope_parameters", {}).get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    types = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(set(index.values())):
        with safe_open(str(model / file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_tensor(name)
                if name.endswith("q_proj.weight"):
                    t = permute_rope(t, heads)
                elif name.endswith("k_proj.weight"):
                    t = permute_rope(t, kv)
                w.add_tensor(gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def ensure_gguf(workdir: Path, model: Path, fmt: str, bin_dir: Path, gguf_py: Path) -> Path:
    out = workdir / "gguf" / f"{model.name}-{GGUF_TYPES[fmt]}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    f32 = out.with_name(f"{model.name}-F32.gguf")
    if not f32.is_file():
        print(f"writing {f32} ...", file=sys.stderr, flush=True)
        write_f32_gguf(model, f32, gguf_py)
    if fmt != "fp32":
        print(f"llama-quantize {f32.name} -> {out.name} ...", file=sys.stderr, flush=True)
        tmp = out.with_name(out.name + ".partial")
        p = subprocess.run([str(bin_dir / "llama-quantize"), "--pure", str(f32), str(tmp), GGUF_TYPES[fmt]],
                           capture_output=True, text=True)
        if p.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise UserError(f"llama-quantize failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, out)
    return out


def gguf_token_bytes(path: Path, gguf_py: Path) -> int:
    """Bytes of the matrices one decoding step reads (all but the embedding, of which it reads one row)."""
    gguf = import_gguf(gguf_py)
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def llama_bench(bin_dir: Path, gguf_file: Path, test: str, tokens: int, threads: int, timeout: float) -> float | str:
    """One llama-bench run of one test (pp: prefill of `tokens`, tg: decoding them): its ms (tg: per token), or
    why it failed (llama.cpp's own crash in one test should not hide the other)."""
    sizes = ["-p", str(tokens), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(tokens)]
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf_file), *sizes, "-t", str(threads), "-r", "1", "-o", "json"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"ran past {timeout:.0f} s"
    if p.returncode != 0:
        return f"signal {-p.returncode}" if p.returncode < 0 else f"exit {p.returncode}"
    (result,) = json.loads(p.stdout)
    return result["avg_ns"] / 1e6 / (result["n_gen"] if test == "tg" else 1)


def median_or_failure(values: list[float | str]) -> str:
    """The median of the runs that gave a time, or the first failure if none did."""
    times = [v for v in values if isinstance(v, float)]
    return f"{statistics.median(times):.1f}" if times else str(values[0])


def compare(a: argparse.Namespace, bin_dir: Path, gguf_py: Path, model: Path, ggufs: dict[str, Path]) -> None:
    """The interleaved runs and the table."""
    fmts, sizes, workdir = a.formats.split(","), [int(x) for x in a.world_sizes.split(",")], Path(a.workdir)
    shards = {(n, f): ensure_format_split(workdir, model, n, f) for n in sizes for f in fmts}
    ids = prompt_ids(a.prompt_tokens)
    bw_start = max(read_bandwidths(cores()))
    ours: dict[tuple[int, str], list[dict[str, Any]]] = {k: [] for k in shards}
    theirs: dict[tuple[str, str], list[float | str]] = {(f, t): [] for f in fmts for t in ("pp", "tg")}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for rep in range(1, a.repeats + 1):
        for f in fmts:
            print(f"[repeat {rep}/{a.repeats}] {f}: llama.cpp {GGUF_TYPES[f]}, tpi_mpi N={a.world_sizes} ...",
                  file=sys.stderr, flush=True)
            for test, tokens in (("pp", a.prompt_tokens), ("tg", a.new_tokens)):
                theirs[(f, test)].append(llama_bench(bin_dir, ggufs[f], test, tokens, cores(), a.timeout))
            for n in sizes:
                out = workdir / "runs" / f"{stamp}-llamacpp-n{n}-{f}-r{rep}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                ours[(n, f)].append(run_tpi(model, shards[(n, f)], n, ids, a.new_tokens, out, a.timeout))
    bw = min(bw_start, max(read_bandwidths(cores())))
    print(f"\n{a.preset} shapes, {a.layers} layers | {cores()} cores (llama.cpp -t {cores()}; tpi_mpi threads = cores "
          f"/ N) | prompt {a.prompt_tokens} tok, {a.new_tokens} new tok | median of {a.repeats} interleaved repeats "
          f"| read bandwidth {bw / 1e9:.1f} GB/s (the lower of start and end)")
    print("\n| engine | weights | prefill ms | token ms | MB/token | bound ms | token / bound | vs llama.cpp |")
    print("|---|---|---|---|---|---|---|---|")
    for f in fmts:
        lb = gguf_token_bytes(ggufs[f], gguf_py)
        tg = [v for v in theirs[(f, "tg")] if isinstance(v, float)]
        lt = statistics.median(tg) if tg else None
        bound = lb / bw * 1e3
        ratio = f"{lt / bound:.2f}" if lt else "-"
        print(f"| llama.cpp | {GGUF_TYPES[f]} | {median_or_failure(theirs[(f, 'pp')])} | "
              f"{median_or_failure(theirs[(f, 'tg')])} | {lb / 1e6:.0f} | {bound:.1f} | {ratio} | 1.00 |")
        for n in sizes:
            recs = ours[(n, f)]
            ob = sum(token_bytes(shards[(n, f)], n))
            ot = statistics.median(r["token_latency_s"]["p50"] for r in recs) * 1e3
            op = statistics.median(r["ttft_s"] for r in recs) * 1e3
            print(f"| tpi_mpi N={n} | {f} | {op:.0f} | {ot:.1f} | {ob / 1e6:.0f} | {ob / bw * 1e3:.1f} | "
                  f"{ot / (ob / bw * 1e3):.2f} | {f'{ot / lt:.2f}' if lt else '-'} |")


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.bench.llamacpp", description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (gguf-py, build/bin)")
    p.add_argument("--bin", default=None, help="where llama-bench and llama-quantize are (default DIR/build/bin)")
    p.add_argument("--formats", default="fp32,fp16,int8,int4-g64", help=f"of {', '.join(GGUF_TYPES)}")
    p.add_argument("--world-sizes", default="1,2", help="of the tpi_mpi runs")
    p.add_argument("--preset", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="bench_out/tp_latency")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--keep-gguf", action="store_true",
                   help="keep the GGUF files (WORKDIR/gguf, 8 GB at the defaults) for the next run; by default they "
                        "are removed at the end, also after a failure or an interrupt")
    a = p.parse_args(argv)
    root = Path(a.llama_cpp)
    bin_dir, gguf_py = Path(a.bin) if a.bin else root / "build" / "bin", root / "gguf-py"
    for need in (bin_dir / "llama-bench", bin_dir / "llama-quantize", gguf_py / "gguf"):
        if not need.exists():
            raise UserError(f"{need} does not exist: --llama-cpp is a built llama.cpp tree (docs/quantization.md)")
    for f in a.formats.split(","):
        if f not in GGUF_TYPES:
            raise UserError(f"--formats {f}: one of {', '.join(GGUF_TYPES)}")
    workdir = Path(a.workdir)
    model = ensure_checkpoint(workdir, a.preset, a.layers)
    try:
        ggufs = {f: ensure_gguf(workdir, model, f, bin_dir, gguf_py) for f in a.formats.split(",")}
        compare(a, bin_dir, gguf_py, model, ggufs)
    finally:
        if not a.keep_gguf:
            shutil.rmtree(workdir / "gguf", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
