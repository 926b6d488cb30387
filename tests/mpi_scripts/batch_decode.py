"""Under mpirun: sequences decoded alone, then batched (all at once; joining, leaving, cancelled, refused,
queued; a prompt extending a finished one's), on the same engine; rank 0 writes a JSON of what each got.

usage: batch_decode.py SHARDS OUT.json PROMPTS.json MAX_BATCH PREFILL_CHUNK ALGO [stream]

PROMPTS.json: six lists of token ids. ALGO: comm.algo (auto: chosen per message size, which the batch changes).
`stream`: every block streamed through a window of 2 (memory.resident=false). For each batched sequence the
JSON has its tokens, its solo run's tokens (the first of them, for a cancelled one) and, per token, the largest
absolute difference between the logits it was sampled from and the solo run's, and the solo run's margin
between its two largest logits there (a near tie that rounding may flip).
"""

import json
import sys

import torch
from mpi4py import MPI

from tpi_mpi.batching import Batcher, Sequence
from tpi_mpi.config import MemoryConfig
from tpi_mpi.engine import Master, Worker
from tpi_mpi.errors import UserError
from tpi_mpi.generate import Sampler, generate
from tpi_mpi.weights.memplan import plan_rank_memory
from tpi_mpi.weights.shards import open_rank_shard

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
shards, out, max_batch, chunk = sys.argv[1], sys.argv[2], int(sys.argv[4]), int(sys.argv[5])
algo = sys.argv[6]
stream = sys.argv[7:] == ["stream"]
shard = open_rank_shard(shards, comm.rank, comm.size)
mem = MemoryConfig(resident=False) if stream else MemoryConfig()
plan = plan_rank_memory(shard, mem, None, comm.rank == 0, slots=max_batch)
CAPACITY = 64
NEW = 10
# Different lengths, one longer than a prefill chunk (it is prefilled over several passes).
with open(sys.argv[3]) as f:
    PROMPTS: list[list[int]] = json.load(f)


class Recorder(Sampler):
    """Greedy, keeping the logits every token came from."""

    def __init__(self) -> None:
        super().__init__(False)
        self.seen: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> int:
        self.seen.append(logits.clone())
        return super().__call__(logits)


def solo(master: Master, ids: list[int], new: int) -> tuple[list[int], list[torch.Tensor]]:
    """The single-sequence path (generate, slot 0), as tpi_mpi.run decodes."""
    rec = Recorder()
    gen = generate(master, ids, new, rec, eos_ids=set(), kv_cache_tokens=CAPACITY)
    return gen.tokens, rec.seen


def seq(ids: list[int], new: int = NEW) -> Sequence:
    return Sequence(list(ids), new, Sampler(False), keep_logits=True)


def compare(s: Sequence, ref: tuple[list[int], list[torch.Tensor]]) -> dict:
    tokens, logits = ref
    n = len(s.tokens)
    diffs = [float((a - b).abs().max()) for a, b in zip(s.logits, logits[:n], strict=True)]
    margins = [float(top[0] - top[1]) for top in (b.topk(2).values for b in logits[:n])]
    scale = max((float(b.abs().max()) for b in logits[:n]), default=0.0)
    return {"tokens": s.tokens, "solo": tokens[:n] if s.finish_reason == "cancelled" else tokens,
            "diffs": diffs, "solo_margins": margins, "logit_scale": scale, "slot": s.slot, "cached": s.cached,
            "finish_reason": s.finish_reason}


if comm.rank != 0:
    w = Worker(comm, shard, algo, plan=plan, max_batch=max_batch)
    w.serve()
    w.close()
    sys.exit(0)

master = Master(comm, shard, algo, plan=plan, max_batch=max_batch)
refs = [solo(master, p, NEW) for p in PROMPTS]
result: dict = {"max_batch": max_batch, "weights": master.weights_record()["label"]}
choices = getattr(master.allreduce, "choices", None)

# 1. All together: more sequences than slots, so some wait for a slot that another frees.
b = Batcher(master, CAPACITY, chunk)
together = [b.submit(seq(p)) for p in PROMPTS]
read0 = master.blocks.stats.blocks_read
b.run()
# Streaming: each pass reads every streamed block once, whatever the number of sequences it carries.
result["together_blocks_read"] = master.blocks.stats.blocks_read - read0
result["streamed_blocks"] = len(plan.streamed)
result["window"] = plan.window
result["together"] = [compare(s, r) for s, r in zip(together, refs, strict=True)]
result["together_stats"] = b.stats.to_json()
result["together_slot_uses"] = b.slot_uses

# 2. Joining and leaving mid-batch: 0 and 1 start; 2 joins after 3 steps, 3 (short) after 4; 1 is cancelled
#    after 6; a refused prompt (token id outside the vocabulary) after 2; 4 and 5 join late.
b = Batcher(master, CAPACITY, chunk)
short = seq(PROMPTS[3], 3)
live = {0: b.submit(seq(PROMPTS[0])), 1: b.submit(seq(PROMPTS[1]))}
refused = None
for i in range(200):
    if i == 2:
        try:
            b.submit(seq([1, 2, master.vocab_size + 5]))
        except UserError as exc:
            refused = str(exc)
    if i == 3:
        live[2] = b.submit(seq(PROMPTS[2]))
    if i == 4:
        live[3] = b.submit(short)
    if i == 6:
        b.cancel(live[1])
    if i == 8:
        live[4] = b.submit(seq(PROMPTS[4]))
        live[5] = b.submit(seq(PROMPTS[5]))
    if not b.busy and i > 8:
        break
    b.step()
short_ref = (refs[3][0][:3], refs[3][1][:3])
result["mid"] = {str(k): compare(s, short_ref if k == 3 else refs[k]) for k, s in live.items()}
result["mid_refused"] = refused
result["mid_slot_uses"] = b.slot_uses

# 3. Prompt cache per slot: a prompt that extends a finished sequence's prompt and tokens prefills only
#    the rest, in the slot that holds them; its tokens are those of a fresh solo run.
b = Batcher(master, CAPACITY, chunk, prompt_cache=True)
first = [b.submit(seq(PROMPTS[0])), b.submit(seq(PROMPTS[2]))]
b.run()
follow = PROMPTS[0] + first[0].tokens + [17, 23]
again = b.submit(seq(follow, 6))
other = b.submit(seq(PROMPTS[5], 6))
b.run()
result["cache"] = [compare(again, solo(master, follow, 6)), compare(other, solo(master, PROMPTS[5], 6))]
result["cache_first_slot"] = first[0].slot
# comm.algo=auto: the message sizes it chose an algorithm for (one per number of positions a pass carried)
result["auto_sizes"] = sorted(choices) if choices is not None else None

master.stop()
master.close()
with open(out, "w") as f:
    json.dump(result, f)
