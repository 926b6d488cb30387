"""Held-out perplexity: how a text is cut into windows and scored, shared by tpi_mpi.eval (our tensor-parallel
engine), the training report and the tests (transformers on one process), so all score the same tokens.

The text is encoded without special tokens and cut into consecutive, non-overlapping chunks of `window`
tokens; each chunk is fed as [<s>] + chunk[:-1] (window positions, as in training) and every token of the chunk
is scored given the <s> and the tokens before it in its chunk. So every token of the text is scored exactly
once, with between 0 and window-1 tokens of context. perplexity = exp(sum of -log p(token) / tokens scored).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


def windows(ids: list[int], window: int, bos_id: int) -> Iterator[tuple[list[int], list[int]]]:
    """(input ids, target ids) per window: [bos] + chunk[:-1] and chunk; position j predicts chunk[j]."""
    if window < 1:
        raise ValueError(f"a window needs at least 1 position, got {window}")
    for i in range(0, len(ids), window):
        chunk = ids[i:i + window]
        yield [bos_id, *chunk[:-1]], chunk


def nll_sum(logits: torch.Tensor, targets: list[int]) -> float:
    """Sum over positions of -log softmax(logits)[target], in float64 (logits: [positions, vocab])."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    t = torch.tensor(targets, dtype=torch.long)
    return float(-logp.gather(1, t.unsqueeze(1)).sum())


@dataclass
class Score:
    nll: float = 0.0  # sum of -log p, nats
    tokens: int = 0
    windows: int = 0

    def add(self, logits: torch.Tensor, targets: list[int]) -> None:
        self.nll += nll_sum(logits, targets)
        self.tokens += len(targets)
        self.windows += 1

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def score(forward: Callable[[list[int]], torch.Tensor], ids: list[int], window: int, bos_id: int) -> Score:
    """`forward(input ids)` -> logits of every position [len, vocab]; scores `ids` window by window."""
    s = Score()
    for inputs, targets in windows(ids, window, bos_id):
        s.add(forward(inputs), targets)
    return s


def hf_perplexity(model: object, ids: list[int], window: int, bos_id: int, batch: int = 16) -> Score:
    """The reference: a transformers causal LM on this process, the same windows (full ones `batch` at a time:
    each row is its own sequence, so batching changes nothing but the speed)."""
    s = Score()
    pending: list[tuple[list[int], list[int]]] = []

    def flush() -> None:
        if pending:
            with torch.no_grad():
                logits = model(torch.tensor([i for i, _ in pending])).logits  # type: ignore[operator]
            for row, (_, targets) in zip(logits, pending, strict=True):
                s.add(row, targets)
            pending.clear()

    for inputs, targets in windows(ids, window, bos_id):
        if pending and (len(inputs) != len(pending[0][0]) or len(pending) == batch):
            flush()
        pending.append((inputs, targets))
    flush()
    return s


def unigram_perplexity(train_ids: list[int], ids: list[int], vocab_size: int) -> float:
    """A model that ignores context: token frequencies of the training text, add-one smoothed. For scale."""
    counts = torch.bincount(torch.tensor(train_ids, dtype=torch.long), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(float(-logp[torch.tensor(ids, dtype=torch.long)].mean()))
