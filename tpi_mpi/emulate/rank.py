"""Per-rank wrapper that mpirun starts: puts the rank into its device's cgroups and network namespace.

    mpirun -n 8 python -m tpi_mpi.emulate.rank --session tpiemu -- python -m tpi_mpi.run ...

It reads the session's state file, joins the cgroups of its rank (from PMI_RANK / OMPI_COMM_WORLD_RANK),
starts the command inside the rank's namespace (nsenter) with MPICH forced onto the emulated wire, moves
itself back out of the cgroups and waits. If the kernel killed the rank for exceeding its memory cap, it
says so in one line naming the device and its limit. Imports nothing heavy: the rank is in its cgroups
before it imports torch.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from tpi_mpi.emulate import cgroups, netns, state
from tpi_mpi.emulate.profiles import human_bytes
from tpi_mpi.errors import main_guard

# MPICH's default netmod would use shared memory between ranks of one host: force TCP over emu0.
MPICH_ON_THE_WIRE = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp",
                     "FI_TCP_IFACE": netns.IFACE, "FI_TCP_NODELAY": "1"}
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: if the wrapper is killed (mpirun tearing a job down), the rank goes too."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def fail(message: str) -> None:
    print(f"tpi_mpi: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@main_guard
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--help"], ["-h"]):  # the wrapper's own options end at "--": what follows is the rank's
        print(__doc__)
        return 0
    if "--" not in argv:
        fail("usage: python -m tpi_mpi.emulate.rank --session NAME -- COMMAND ...")
    opts, cmd = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    session = opts[opts.index("--session") + 1] if "--session" in opts else "tpiemu"
    rank_text = next((os.environ[v] for v in RANK_VARIABLES if v in os.environ), "")
    if not rank_text or not cmd:
        fail("tpi_mpi.emulate.rank runs under mpirun (no PMI_RANK or OMPI_COMM_WORLD_RANK) with a command after --")
    rank = int(rank_text)
    st = state.load(session)
    if st is None or st.get("status") != "up":
        fail(f"emulation session {session} is not up: python -m tpi_mpi.emulate up session={session} ...")
    assert st is not None
    if rank >= st["devices"]:
        fail(f"rank {rank}, but session {session} has {st['devices']} devices: mpirun -n {st['devices']} or "
             f"up devices={rank + 1}")
    from tpi_mpi.emulate.session import backend_of

    backend = backend_of(st)
    original = cgroups.current()
    if backend is not None:
        cgroups.join(backend, session, rank)
    env = {**os.environ, **MPICH_ON_THE_WIRE, "TPI_MPI_EMU_SESSION": session,
           "TPI_MPI_EMU_NETWORK": st["network"]["name"]}
    full = ["nsenter", f"--net={netns.NETNS_DIR / netns.rank_ns(session, rank)}", "--", *cmd]
    child = subprocess.Popen(full, env=env, close_fds=False, preexec_fn=_die_with_parent)  # PMI fd inherited
    if backend is not None:
        cgroups.leave(backend, original)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, _f: child.send_signal(s))
    code = child.wait()
    if code < 0 and backend is not None and cgroups.oom_kills(backend, session, rank) > 0:
        dev = st["device_profiles"][rank]
        print(f"tpi_mpi: error: rank {rank} (device {dev['name']}) exceeded its memory cap of "
              f"{human_bytes(dev['memory_bytes'])} and was killed by the kernel", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
