"""Generating from the master: the sampler and the prefill-then-decode loop over `Master.forward`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from tpi_mpi.engine import Master
from tpi_mpi.errors import UserError


class Sampler:
    """Greedy, or sampling with temperature, top-k and top-p from a seeded generator."""

    def __init__(self, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0):
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if not self.do_sample:
            return int(torch.argmax(logits))
        logits = logits / self.temperature
        if self.top_k:
            kth = torch.topk(logits, min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= self.top_p  # keeps the first token always
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, -1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]
    ttft_s: float
    token_latencies_s: list[float]


def generate(master: Master, ids: list[int], max_new_tokens: int, sampler: Sampler,
             eos_ids: set[int], kv_cache_tokens: int | None = None, on_token: Any = None) -> Generation:
    """Prefill, then one token at a time. The KV cache is reserved up front for the whole sequence."""
    master.check_prompt(ids)
    max_new_tokens = min(max_new_tokens, master.max_positions - len(ids))
    capacity = kv_cache_tokens or len(ids) + max_new_tokens
    if capacity < len(ids) + max_new_tokens:
        raise UserError(f"memory.kv_cache_tokens={capacity} is less than the prompt plus "
                        f"max_new_tokens ({len(ids) + max_new_tokens}): raise it or set it to null")
    tokens: list[int] = []
    latencies: list[float] = []
    t0 = time.perf_counter()
    ttft = 0.0
    if max_new_tokens > 0:
        tok = sampler(master.forward(ids, 0, capacity))
        ttft = time.perf_counter() - t0
        tokens.append(tok)
        if on_token:
            on_token(tokens)
        while len(tokens) < max_new_tokens and tok not in eos_ids:
            t1 = time.perf_counter()
            tok = sampler(master.forward([tok], len(ids) + len(tokens) - 1))
            latencies.append(time.perf_counter() - t1)
            tokens.append(tok)
            if on_token:
                on_token(tokens)
    return Generation(prompt_tokens=len(ids), tokens=tokens, ttft_s=ttft, token_latencies_s=latencies)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many ids two sequences share from the start: the part of a prompt a KV cache already holds."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
