"""Train the small Llama-architecture model (GQA, RoPE, SwiGLU) on the Shakespeare corpus, in plain torch.

    nice -n 10 python -m tpi_mpi.training.train --out checkpoints/shakespeare     # the committed model
    python -m tpi_mpi.training.train --preset smoke --out /tmp/m --steps 20       # a few seconds, for tests

Deterministic: the tokenizer is learnt from the training text alone, weights are initialised from --seed, and
batches are drawn from a generator seeded with it; on the same torch build and --threads a rerun gives the
same weights. Each batch row is [<s>] + a random crop of the training token stream (as perplexity.py scores).
The checkpoint is a standard Hugging Face one (config.json, model.safetensors, tokenizer with a chat template)
plus training.json: what was trained, how long, and the held-out figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tpi_mpi.errors import UserError, main_guard
from tpi_mpi.perplexity import hf_perplexity, unigram_perplexity
from tpi_mpi.training import corpus as corpus_mod
from tpi_mpi.training.tokenizer import BOS_ID, EOS_ID, train_tokenizer


@dataclass(frozen=True)
class Preset:
    model: dict[str, Any]  # LlamaConfig fields (vocab_size comes from the tokenizer)
    vocab_size: int
    context: int  # positions per training row, <s> included; also the model's max_position_embeddings
    batch: int  # rows per step
    steps: int
    lr: float
    warmup: int  # steps of linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    eval_every: int = 250  # steps between quick held-out checks (eval_windows windows)
    eval_windows: int = 8
    sample_prompt: str = "ROMEO.\n"
    heldout_tokens: int | None = None  # score at most this many held-out tokens at the end (None: all)


PRESETS: dict[str, Preset] = {
    # 8 KV heads (so the demo runs on 8 ranks), 2 query heads each; sized by measurement (docs/trained_model.md)
    "shakespeare": Preset(
        model=dict(hidden_size=256, intermediate_size=688, num_attention_heads=16, num_key_value_heads=8,
                   num_hidden_layers=4),
        vocab_size=4096, context=256, batch=12, steps=500, lr=2e-3, warmup=30, eval_every=100,
    ),
    # For the test suite: trains in seconds on a slice of the corpus.
    "smoke": Preset(
        model=dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=2),
        vocab_size=320, context=32, batch=8, steps=30, lr=1e-2, warmup=5, eval_every=0, eval_windows=4,
        heldout_tokens=2048,
    ),
}


def llama_config(preset: Preset, vocab_size: int) -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(**preset.model, vocab_size=vocab_size, max_position_embeddings=preset.context,
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None, tie_word_embeddings=False,
                         rms_norm_eps=1e-5)  # RoPE: transformers' default (theta 10000)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    return config


def learning_rate(p: Preset, step: int) -> float:
    """Linear warm-up to p.lr over p.warmup steps, then cosine down to p.lr * p.min_lr_ratio at p.steps."""
    if step <= p.warmup:
        return p.lr * step / max(1, p.warmup)
    t = (step - p.warmup) / max(1, p.steps - p.warmup)
    return p.lr * (p.min_lr_ratio + (1 - p.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch(stream: torch.Tensor, rows: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs [<s>, t0 .. t_{T-2}] and targets [t0 .. t_{T-1}] of `rows` random crops of the stream."""
    starts = torch.randint(0, len(stream) - context + 1, (rows,), generator=gen)
    y = torch.stack([stream[s:s + context] for s in starts.tolist()])
    x = torch.cat([torch.full((rows, 1), BOS_ID, dtype=y.dtype), y[:, :-1]], dim=1)
    return x, y


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Result:
    losses: list[float] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def train(out: str | Path, preset: Preset, seed: int = 0, threads: int = 1, corpus_dir: str | Path | None = None,
          train_chars: int | None = None, log_every: int = 10, command: str | None = None,
          quiet: bool = False) -> Result:
    """Train, then write the checkpoint to `out` (a new folder, renamed into place when complete)."""
    from transformers import LlamaForCausalLM

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new --out or remove it")

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    corpus = corpus_mod.fetch(corpus_dir, quiet=quiet)
    text = corpus.train.read_text(encoding="utf-8")[:train_chars]
    heldout_text = corpus.heldout.read_text(encoding="utf-8")[:train_chars]
    tok = train_tokenizer(text.splitlines(keepends=True), preset.vocab_size)
    stream = torch.tensor(tok(text, add_special_tokens=False).input_ids, dtype=torch.long)
    heldout = tok(heldout_text, add_special_tokens=False).input_ids
    if len(stream) <= preset.context:
        raise UserError(f"{len(stream)} training tokens are too few for a context of {preset.context}")
    config = llama_config(preset, len(tok))
    model = LlamaForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": preset.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=preset.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    tokens_per_step = preset.batch * preset.context
    say(f"training: {n_params / 1e6:.2f} M parameters ({(n_params - n_embed) / 1e6:.2f} M without embedding and "
        f"head), vocab {len(tok)}, {len(stream):,} training tokens, {preset.steps} steps x {tokens_per_step} "
        f"tokens = {preset.steps * tokens_per_step / len(stream):.2f} epochs, {threads} threads")
    result = Result()
    t0 = time.perf_counter()
    window_t, window_tokens = t0, 0
    for step in range(1, preset.steps + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(preset, step)
        x, y = batch(stream, preset.batch, preset.context, gen)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        result.losses.append(float(loss.detach()))
        window_tokens += tokens_per_step
        if step % log_every == 0 or step == preset.steps:
            now = time.perf_counter()
            rate = window_tokens / (now - window_t)
            avg = (now - t0) / step
            recent = result.losses[-log_every:]
            say(f"step {step}/{preset.steps} | loss {sum(recent) / len(recent):.3f}"
                f" | lr {learning_rate(preset, step):.2e} | {rate:,.0f} tok/s | elapsed {_duration(now - t0)}"
                f" | ETA {_duration(avg * (preset.steps - step))}")
            window_t, window_tokens = now, 0
        if preset.eval_every and step % preset.eval_every == 0 and step < preset.steps:
            model.eval()
            quick = hf_perplexity(model, heldout[:preset.eval_windows * preset.context], preset.context, BOS_ID)
            model.train()
            say(f"step {step}: held-out perplexity {quick.perplexity:.2f} (first {quick.tokens} tokens)")
    train_s = time.perf_counter() - t0
    model.eval()
    full = hf_perplexity(model, heldout[:preset.heldout_tokens], preset.context, BOS_ID)
    unigram = unigram_perplexity(stream.tolist(), heldout[:preset.heldout_tokens], len(tok))
    sample = greedy_sample(model, tok, preset.sample_prompt, 48)
    tail = result.losses[-50:]
    result.report = {
        "command": command,
        "preset": asdict(preset),
        "seed": seed, "threads": threads, "torch": torch.__version__,
        "parameters": n_params, "parameters_without_embeddings": n_params - n_embed,
        "corpus": {**corpus.manifest(), "train_chars_used": len(text)},
        "train_tokens_in_corpus": len(stream),
        "tokens_trained": preset.steps * tokens_per_step,
        "epochs": preset.steps * tokens_per_step / len(stream),
        "train_seconds": train_s,
        "tokens_per_s": preset.steps * tokens_per_step / train_s,
        "final_train_loss": sum(tail) / len(tail),
        "heldout": {"tokens": full.tokens, "windows": full.windows, "window": preset.context,
                    "perplexity": full.perplexity, "unigram_perplexity": unigram},
        "sample": {"prompt": preset.sample_prompt, "greedy_48_tokens": sample},
        "total_seconds": time.perf_counter() - t_start,
    }
    say(f"trained in {_duration(train_s)} ({result.report['tokens_per_s']:,.0f} tok/s); held-out perplexity "
        f"{full.perplexity:.2f} over {full.tokens:,} tokens (unigram baseline {unigram:.1f})")
    say(f"sample: {preset.sample_prompt + sample!r}")
    _save(out, model, tok, result.report)
    return result


def greedy_sample(model: Any, tok: Any, prompt: str, new_tokens: int) -> str:
    ids = tok(prompt).input_ids
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids[-model.config.max_position_embeddings:]])).logits[0, -1].argmax()))
    return tok.decode(ids[len(tok(prompt).input_ids):], skip_special_tokens=True)


def _save(out: Path, model: Any, tok: Any, report: dict[str, Any]) -> None:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    if out.exists():  # empty, checked before training
        out.rmdir()
    tmp.rename(out)


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.training.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="new folder for the checkpoint")
    p.add_argument("--preset", default="shakespeare", choices=list(PRESETS))
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared machine a second one mostly spins waiting for the first (measured: CPU
    # time per step 2.0 s with 1 thread, 3.9 s with 2, under load); the weights depend on the thread count.
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; the result depends on it)")
    p.add_argument("--corpus-dir", default=None, help=f"corpus cache (default ${corpus_mod.DIR_ENV} or "
                                                      f"{corpus_mod.DEFAULT_DIR}); fetched on first use")
    p.add_argument("--train-chars", type=int, default=None, help="use only the first N characters of each split")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    command = "python -m tpi_mpi.training.train " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        train(args.out, preset, args.seed, args.threads, args.corpus_dir, args.train_chars, args.log_every, command)
    except UserError as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr)  # the one error line every entry point prints
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
