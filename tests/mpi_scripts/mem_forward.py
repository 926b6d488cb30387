"""Under mpirun: greedy generation once per memory plan, in one process; rank 0 saves an npz.

usage: mem_forward.py [--head-chunk=BYTES] SHARDS OUT.npz NEW_TOKENS SPEC[,SPEC...] ID [ID ...]

SPEC: `resident`, `stream:W` (every block streamed through W buffers), `partial:W:K` (W buffers, K FFN
blocks kept resident, spread over the layers) or `auto:BUDGET` (memory.budget: bytes, 400MB or cgroup);
a suffix `@master` puts all of lm_head on rank 0 (memory.head=master; default split by vocabulary).
The npz holds, per spec i: tokens_i, and per rank max_held_i (most streamed blocks in memory at once),
window_i, streamed_i, bytes_read_i, head_bytes_read_i (lm_head's share); and mode_i on rank 0.
A budget too small stops every rank with one clear line (as tpi_mpi.run does).
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

import tpi_mpi.engine
from tpi_mpi.config import MemoryConfig
from tpi_mpi.engine import Master, Worker
from tpi_mpi.errors import UserError, agree_or_abort
from tpi_mpi.generate import Sampler, generate
from tpi_mpi.weights.memplan import MemoryPlan, _spread, plan_rank_memory
from tpi_mpi.weights.shards import open_rank_shard

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
args = sys.argv[1:]
if args[0].startswith("--head-chunk="):
    tpi_mpi.engine.HEAD_CHUNK_BYTES = int(args.pop(0).split("=")[1])  # several lm_head chunks on small models
shards, out, new_tokens, specs = args[0], args[1], int(args[2]), args[3].split(",")
ids = [int(i) for i in args[4:]]
shard = open_rank_shard(shards, comm.rank, comm.size)
saved: dict[str, np.ndarray] = {}


def plan_for(spec: str, head: str) -> MemoryPlan:
    kind, _, value = spec.partition(":")
    if kind == "partial":  # a plan made by hand: K FFN blocks resident, the rest streamed
        w, k = (int(v) for v in value.split(":"))
        keys = sorted(shard.block_files())
        keep = set(_spread([key for key in keys if key[1] == "ffn"], k))
        return MemoryPlan("partial", w, tuple(key for key in keys if key not in keep), False)
    mem = {"resident": lambda: MemoryConfig(resident=True, head=head),
           "stream": lambda: MemoryConfig(resident=False, window=int(value), head=head),
           "auto": lambda: MemoryConfig(resident="auto", budget=value, head=head)}[kind]()
    plan, error = None, None
    try:
        plan = plan_rank_memory(shard, mem, None, comm.rank == 0)
    except UserError as exc:
        error = str(exc)
    agree_or_abort(comm, error)
    assert plan is not None
    return plan


for i, spec_head in enumerate(specs):
    spec, _, head = spec_head.partition("@")
    head = head or "split"
    plan = plan_for(spec, head)
    if comm.rank == 0:
        master = Master(comm, shard, "star", plan=plan, head=head)
        gen = generate(master, ids, new_tokens, Sampler(False), eos_ids=set(), )
        master.stop()
        engine = master
        saved[f"tokens_{i}"] = np.array(gen.tokens)
        saved[f"mode_{i}"] = np.array(plan.mode)
    else:
        engine = Worker(comm, shard, "star", plan=plan, head=head)
        engine.serve()
    engine.close()  # the prefetcher's thread and buffers go before the next plan's
    stats = engine.blocks.stats
    rows = comm.gather((stats.max_blocks_held, plan.window, len(plan.streamed), stats.bytes_read,
                        stats.head_bytes_read), root=0)
    if comm.rank == 0:
        for j, name in enumerate(("max_held", "window", "streamed", "bytes_read", "head_bytes_read")):
            saved[f"{name}_{i}"] = np.array([r[j] for r in rows])
if comm.rank == 0:
    np.savez(out, **saved)
