"""Continuous batching on the master: up to `max_batch` sequences decoded together, one forward pass a step.

Every sequence has a KV cache slot of its own on every rank (reserved up front, counted by the memory plan)
and its own position and sampler here on rank 0. A step (Batcher.step) is one forward pass:
  1. sequences cancelled since the last step leave, and free their slot;
  2. waiting sequences take the free slots, first come first served (a full batch leaves the rest waiting):
     with the prompt cache, the free slot whose cache holds the longest prefix of its prompt, if that prefix
     is at least half of what the slot holds (a conversation's next turn finds its slot; an unrelated prompt
     sharing only a first token or a system prompt does not evict it); else the least recently used;
  3. the pass carries the next token of every decoding sequence and prefill chunks of the sequences still
     prefilling, at most `prefill_chunk` prompt tokens in all, so that a long prompt delays the others' next
     token by at most one chunk's compute (and a pass never carries more than chunk + max_batch positions);
  4. every sequence whose logits came back samples its next token; a finished one leaves and frees its slot.
A sequence sees the same numbers as alone except for the order in which the batched matrix products sum
(see tests/test_batching.py for the tolerance); its attention runs on its own slot exactly as alone.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import torch

from tpi_mpi.engine import Master, Step
from tpi_mpi.errors import UserError
from tpi_mpi.generate import Sampler, common_prefix


@dataclass(eq=False)
class Sequence:
    """One request's generation. The fields after `eos_ids` are the batcher's (read them, do not set them)."""

    ids: list[int]  # the prompt's token ids
    max_new_tokens: int
    sampler: Sampler
    eos_ids: frozenset[int] = frozenset()
    keep_logits: bool = False  # keep the logits each token was sampled from (tests)
    slot: int | None = None
    cached: int = 0  # prompt positions found in its slot's KV cache (the prompt cache), not prefilled
    prefilled: int = 0  # prompt positions whose keys and values its slot holds
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    finish_reason: str | None = None  # stop (end of sequence token), length (max_new_tokens), cancelled
    cancel_requested: bool = False
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft_s(self) -> float | None:
        """Arrival to first token, the wait for a slot included."""
        return self.token_times[0] - self.arrived if self.token_times else None

    @property
    def token_latencies_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class BatchStats:
    passes: int = 0
    pass_s: float = 0.0  # wall time of the forward passes (sampling included)
    decode_tokens: int = 0  # tokens sampled
    prefill_tokens: int = 0  # prompt positions run (cached ones not counted)
    occupancy: Counter[int] = field(default_factory=Counter)  # passes by the number of sequences they carried

    def to_json(self) -> dict[str, Any]:
        mean = sum(k * v for k, v in self.occupancy.items()) / self.passes if self.passes else None
        return {"passes": self.passes, "pass_s": self.pass_s, "decode_tokens": self.decode_tokens,
                "prefill_tokens": self.prefill_tokens, "mean_occupancy": mean,
                "occupancy": {str(k): v for k, v in sorted(self.occupancy.items())}}


class Batcher:
    """Rank 0's continuous batching over Master.forward_batch; one thread calls everything here."""

    def __init__(self, master: Master, capacity: int, prefill_chunk: int, prompt_cache: bool = False):
        """`capacity`: KV cache positions of each slot (prompt plus generated tokens of one sequence);
        `prefill_chunk`: the most prompt positions one pass prefills."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.master = master
        self.capacity = capacity
        self.prefill_chunk = prefill_chunk
        self.prompt_cache = prompt_cache
        self.slots: list[Sequence | None] = [None] * master.max_batch
        self.slot_ids: list[list[int]] = [[] for _ in self.slots]  # the ids each slot's KV cache holds, in order
        self.slot_uses = [0] * master.max_batch  # sequences each slot has held
        self.slot_freed = [-1] * master.max_batch  # the pass after which each slot was last freed
        self.running: list[Sequence] = []  # in order of admission
        self.waiting: deque[Sequence] = deque()
        self.stats = BatchStats()

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def free_slots(self) -> int:
        return sum(s is None for s in self.slots)

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence; it joins the batch at the next step with a free slot. A prompt that cannot be
        generated is refused here (UserError), before it touches any rank."""
        self.master.check_prompt(seq.ids)
        if not seq.ids:
            raise UserError("the prompt is empty: give at least one token")
        if len(seq.ids) >= self.capacity:
            raise UserError(f"the prompt has {len(seq.ids)} tokens but a sequence has {self.capacity} positions "
                            "(memory.kv_cache_tokens): shorten the prompt")
        seq.max_new_tokens = min(seq.max_new_tokens, self.capacity - len(seq.ids))
        if seq.max_new_tokens <= 0:
            seq.finish_reason = "length"
            return seq
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves at the next step boundary (a waiting one at once)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.finish_reason = "cancelled"
        else:
            seq.cancel_requested = True

    def _leave(self, seq: Sequence, reason: str) -> None:
        assert seq.slot is not None
        seq.finish_reason = reason
        # What the slot's cache now holds: the prompt as far as prefilled, then every token fed back (the
        # last sampled one never was).
        held = seq.ids[:seq.prefilled] if seq.prefilled < len(seq.ids) else seq.ids + seq.tokens[:-1]
        self.slot_ids[seq.slot] = held
        self.slot_freed[seq.slot] = self.stats.passes
        self.slots[seq.slot] = None
        self.running.remove(seq)

    def _choose_slot(self, ids: list[int]) -> tuple[int, int]:
        """(slot, prompt positions its cache already holds) for a new sequence; see the module's step 2."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        lru = min(free, key=lambda i: self.slot_freed[i])
        if not self.prompt_cache:
            return lru, 0
        prefix = {i: common_prefix(self.slot_ids[i], ids) for i in free}
        match = [i for i in free if prefix[i] > 0 and 2 * prefix[i] >= len(self.slot_ids[i])]
        if not match:
            return lru, 0
        best = max(match, key=lambda i: prefix[i])
        return best, min(prefix[best], len(ids) - 1)  # the last prompt position runs: its logits give a token

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            slot, start = self._choose_slot(seq.ids)
            self.slot_ids[slot] = self.slot_ids[slot][:start]  # positions from `start` on are overwritten
            seq.slot, seq.cached, seq.prefilled, seq.admitted = slot, start, start, time.monotonic()
            self.slots[slot] = seq
            self.slot_uses[slot] += 1
            self.running.append(seq)

    def _plan(self) -> list[tuple[Sequence, Step]]:
        plan: list[tuple[Sequence, Step]] = []
        budget = self.prefill_chunk
        for seq in self.running:
            assert seq.slot is not None
            if seq.prefilled < len(seq.ids):
                if budget == 0:
                    continue
                n = min(budget, len(seq.ids) - seq.prefilled)
                budget -= n
                last = seq.prefilled + n == len(seq.ids)
                # A fresh sequence reserves its slot at full capacity, so a slot's cache is allocated once.
                plan.append((seq, Step(seq.slot, seq.ids[seq.prefilled:seq.prefilled + n], seq.prefilled,
                                       self.capacity if seq.prefilled == 0 else 0, 1 if last else 0)))
            else:
                plan.append((seq, Step(seq.slot, [seq.tokens[-1]], len(seq.ids) + len(seq.tokens) - 1)))
        return plan

    def step(self) -> list[Sequence]:
        """One forward pass over the batch; returns the sequences that got a token or finished in it."""
        for seq in [s for s in self.running if s.cancel_requested]:
            self._leave(seq, "cancelled")
        self._admit()
        if not self.running:
            return []
        plan = self._plan()
        t0 = time.monotonic()
        logits = self.master.forward_batch([step for _, step in plan])
        now = time.monotonic()
        touched = []
        for (seq, step), lg in zip(plan, logits, strict=True):
            if step.start < len(seq.ids):  # a prefill chunk
                seq.prefilled += len(step.ids)
                self.stats.prefill_tokens += len(step.ids)
            if not step.rows:
                continue
            token = seq.sampler(lg[-1])
            if seq.keep_logits:
                seq.logits.append(lg[-1].clone())
            seq.tokens.append(token)
            seq.token_times.append(now)
            self.stats.decode_tokens += 1
            touched.append(seq)
            if token in seq.eos_ids:
                self._leave(seq, "stop")
            elif len(seq.tokens) >= seq.max_new_tokens:
                self._leave(seq, "length")
        self.stats.passes += 1
        self.stats.occupancy[len(plan)] += 1
        self.stats.pass_s += time.monotonic() - t0
        return touched

    def run(self) -> None:
        """Step until every sequence submitted so far is done."""
        while self.busy:
            self.step()
