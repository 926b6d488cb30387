"""A throwaway single-node Slurm cluster on 127.0.0.1, for testing slurm/*.sbatch on one machine.

Everything it makes lives in one directory: its own munge key and socket, slurm.conf, state, spool and
logs, on free ports. munged, slurmctld and slurmd run in the foreground as child processes of this one,
so stopping them needs no system service. Needs root (slurmd starts job steps as the submitting user)
and Debian's slurm-wlm and munge.

    python -m tpi_mpi.cluster.local_slurm --dir /tmp/slurm     # prints `export SLURM_CONF=...`; Ctrl-C stops it

Used by tests/test_slurm.py as a fixture (one cluster for the module).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tpi_mpi.errors import main_guard

NODE = "tpinode"
PARTITION = "tpi"
MARKER = "TPI_LOCAL_SLURM"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")


class SlurmUnavailable(Exception):
    """This machine cannot run a local cluster (not root, binaries missing, daemons did not come up)."""


def missing_requirement() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd runs job steps as the submitting user)"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def slurm_conf(root: Path, cpus: int, oversubscribe: int, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf for one node: no cgroups, no accounting, nothing outside `root`."""
    return f"""\
ClusterName=tpilocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Our own munged: the system one (if any) has another key.
AuthInfo=socket={root}/sock/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: the machine may have cgroup v1 or v2, and the emulation makes its own.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Cancelled steps get SIGKILL after 2 s, so a stuck rank cannot outlive its job for long.
KillWait=2
MessageTimeout=10
# sbatch --wait polls after 2 s, 8 s, then every 32 s, growing only while the interval is below
# MinJobAge/2: with the default 300 a job of 11 s is seen to end at 42 s. With 4 it polls every 2 s
# (ended jobs leave slurmctld's memory 4 s after they end, after sbatch has seen them).
MinJobAge=4
MailProg=/bin/true
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname=localhost CPUs={cpus} State=UNKNOWN
# OverSubscribe=FORCE lets jobs with --overcommit run more ranks than cores (emulated devices).
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:{oversubscribe}
"""


def _mpich_shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("mpich_shm_*")} if Path("/dev/shm").is_dir() else set()


def _in_use(paths: set[str]) -> set[str]:
    """Which of these /dev/shm names some process still has open or mapped."""
    used: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            maps = (proc / "maps").read_text()
            fds = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # the process ended, or is not ours to read
            continue
        for name in paths:
            if name in maps or any(fd.endswith("/" + name) for fd in fds):
                used.add(name)
    return used


@dataclass
class LocalSlurm:
    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    oversubscribe: int = 8
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    shm_before: set[str] = field(default_factory=set)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch/srun/squeue against this cluster (any outer job's SLURM_* dropped)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def log(self, name: str, tail: int = 40) -> str:
        path = self.root / "log" / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-tail:]) if path.is_file() else ""

    def diagnostics(self) -> str:
        """What to look at when a job does not finish: queue, node state and the daemons' logs."""
        parts = []
        for cmd in (["squeue", "-o", "%i %T %r %N"], ["scontrol", "show", "node", NODE]):
            try:
                out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=10)
                parts.append(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
            except subprocess.TimeoutExpired:
                parts.append(f"$ {' '.join(cmd)}: no answer in 10 s")
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            parts.append(f"--- {name}\n{self.log(name)}")
        return "\n".join(parts)

    def start(self, timeout: float = 30) -> LocalSlurm:
        reason = missing_requirement()
        if reason:
            raise SlurmUnavailable(reason)
        self.shm_before = _mpich_shm()
        for d in ("munge", "sock", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)  # munged refuses a key others could read
        (self.root / "sock").chmod(0o755)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(slurm_conf(self.root, self.cpus, self.oversubscribe, _free_port(), _free_port()))
        sock = self.root / "sock" / "munge.socket"
        try:
            self._spawn("munged", [_binary("munged"), "--foreground", "--force", f"--socket={sock}",
                                   f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                                   f"--seed-file={self.root}/munge/munged.seed", "--num-threads=2"])
            self._wait(lambda: sock.exists(), timeout, "munged did not create its socket")
            self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_binary("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait(self._node_idle, timeout, f"node {NODE} did not become idle")
        except BaseException:
            self.stop(remove=False)
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # The marker is inherited by the slurmstepd daemons slurmd forks, so that stop() can find them.
        env = {**self.env, MARKER: str(self.root)}
        with open(self.root / "log" / f"{name}.out", "wb") as out:
            self.procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                env=env, start_new_session=True)

    def _wait(self, ready: object, timeout: float, what: str) -> None:
        """Poll a readiness condition (a daemon coming up); fail with the logs when it does not."""
        deadline = time.monotonic() + timeout
        while not ready():  # type: ignore[operator]
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
                raise SlurmUnavailable(f"{what} ({why}):\n{self.diagnostics()}")
            time.sleep(0.2)

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%t"], env=self.env, capture_output=True,
                             text=True, timeout=10)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self, remove: bool = True) -> None:
        """Cancel every job, stop the daemons, kill what they left, remove MPICH shm leftovers and state."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            try:
                subprocess.run(["scancel", "--full", f"--partition={PARTITION}"], env=self.env,
                               capture_output=True, timeout=10)
                self._wait_queue_empty(timeout=15)
            except (subprocess.TimeoutExpired, SlurmUnavailable):
                pass  # the daemons are stopped below anyway and their leftovers killed
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._kill_leftovers()
        new = _mpich_shm() - self.shm_before
        for name in new - _in_use(new):  # segments of ranks killed with their job (nobody maps them any more)
            Path("/dev/shm", name).unlink(missing_ok=True)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def _wait_queue_empty(self, timeout: float) -> None:
        def empty() -> bool:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                 timeout=10)
            return out.returncode == 0 and not out.stdout.strip()

        self._wait(empty, timeout, "jobs did not end after scancel")

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster (after stop(): what the daemons left): slurmstepd (it carries MARKER)
        and job processes (our SLURM_CONF and a job id). A shell that merely exported our SLURM_CONF has no
        job id and is not one of them."""
        marker = f"{MARKER}={self.root}".encode()
        conf = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:  # ended meanwhile
                continue
            if marker in env or (conf in env and any(v.startswith(b"SLURM_JOB_ID=") for v in env)):
                pids.append(int(proc.name))
        return pids

    def _kill_leftovers(self) -> None:
        deadline = time.monotonic() + 10
        while (pids := self.leftover_pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            time.sleep(0.1)  # until they are gone: a killed process lingers until the kernel tears it down

@main_guard
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="directory for the cluster's key, config, state and logs")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the one node")
    parser.add_argument("--oversubscribe", type=int, default=8, help="jobs per CPU with --overcommit")
    args = parser.parse_args()
    cluster = LocalSlurm(Path(args.dir).resolve(), args.cpus, args.oversubscribe)
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"export SLURM_CONF={cluster.conf}   # local cluster up; Ctrl-C stops it and removes {args.dir}",
          flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    main()
