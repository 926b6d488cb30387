"""Run a Python script or module in a memory cgroup of its own, joined BEFORE anything is imported (memory
charges do not move with a process, so torch must be loaded from inside).

usage (one per rank, under mpirun): in_memcg.py PARENT_CGROUP_DIR LIMIT_BYTES (SCRIPT | -m MODULE) ARGS...

Creates PARENT/rank_R (R from the MPI launcher's environment) with the limit and moves this process into
it. cgroup v1 (memory.limit_in_bytes) or v2 (memory.max, no swap). The caller removes the cgroups.
"""

import os
import runpy
import sys

parent, limit = sys.argv[1], sys.argv[2]
rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
cg = os.path.join(parent, f"rank_{rank}")
os.mkdir(cg)
v2 = os.path.exists(os.path.join(parent, "cgroup.controllers"))
with open(os.path.join(cg, "memory.max" if v2 else "memory.limit_in_bytes"), "w") as f:
    f.write(limit)
if v2 and os.path.exists(os.path.join(cg, "memory.swap.max")):
    with open(os.path.join(cg, "memory.swap.max"), "w") as f:
        f.write("0")
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
rest = sys.argv[3:]
if rest[0] == "-m":
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = rest
    sys.path.insert(0, os.path.dirname(os.path.abspath(rest[0])))
    runpy.run_path(rest[0], run_name="__main__")
