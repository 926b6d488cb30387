"""Under mpirun: the tensor-parallel forward of a prompt, then greedy tokens; rank 0 saves an npz.

usage: tp_forward.py SHARDS OUT.npz NEW_TOKENS ID [ID ...]
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from tpi_mpi.engine import Master, Sampler, Worker, generate
from tpi_mpi.shards import open_rank_shard

comm = MPI.COMM_WORLD
torch.set_num_threads(1)
shards, out, new_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
ids = [int(i) for i in sys.argv[4:]]
shard = open_rank_shard(shards, comm.rank, comm.size, verify_checksums=True)
if comm.rank == 0:
    master = Master(comm, shard, "star")
    logits = master.forward(ids, 0, capacity=len(ids), all_logits=True)
    gen = generate(master, ids, new_tokens, Sampler(False), eos_ids=set())
    master.stop()
    np.savez(out, logits=logits.numpy(), tokens=np.array(gen.tokens))
else:
    Worker(comm, shard, "star").serve()
