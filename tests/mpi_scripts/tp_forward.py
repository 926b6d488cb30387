"""Under mpirun: the tensor-parallel forward of a prompt, then greedy tokens; rank 0 saves an npz.

usage: tp_forward.py [--algos=A,B,...] [--head=split|master] SHARDS OUT.npz NEW_TOKENS ID [ID ...]

With --algos (comm.algo values; default star) the whole run repeats with each allreduce in one process;
the npz holds `logits` and `tokens` of the first and `tokens_ALGO` of each.
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from tpi_mpi.engine import Master, Worker
from tpi_mpi.generate import Sampler, generate
from tpi_mpi.weights.shards import open_rank_shard

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
args = sys.argv[1:]
algos = args.pop(0).removeprefix("--algos=").split(",") if args[0].startswith("--algos=") else ["star"]
head = args.pop(0).removeprefix("--head=") if args[0].startswith("--head=") else "split"
shards, out, new_tokens = args[0], args[1], int(args[2])
ids = [int(i) for i in args[3:]]
shard = open_rank_shard(shards, comm.rank, comm.size, verify_checksums="sha256")
saved: dict[str, np.ndarray] = {}
for algo in algos:
    if comm.rank == 0:
        master = Master(comm, shard, algo, head=head)
        logits = master.forward(ids, 0, capacity=len(ids), all_logits=True)
        gen = generate(master, ids, new_tokens, Sampler(False), eos_ids=set())
        master.stop()
        if not saved:
            saved.update(logits=logits.numpy(), tokens=np.array(gen.tokens))
        saved[f"tokens_{algo}"] = np.array(gen.tokens)
    else:
        Worker(comm, shard, algo, head=head).serve()
if comm.rank == 0:
    np.savez(out, **saved)
