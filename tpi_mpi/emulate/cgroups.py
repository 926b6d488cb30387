"""Per-rank cgroups: memory cap, CPU quota and disk read throttle, on cgroup v1 or v2.

    v1: <mount of each controller>/<session>/r<k>   memory.limit_in_bytes, cpu.cfs_quota_us,
                                                     blkio.throttle.read_bps_device
    v2: <cgroup2 mount>/<session>/r<k>               memory.max, cpu.max, io.max

A rank joins its cgroups before it imports torch (the per-rank wrapper, rank.py, puts itself in them and
then starts the rank): memory is charged to the cgroup of the process that first touches it, and
charges do not move with a process.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tpi_mpi.emulate.profiles import DeviceProfile

CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Backend:
    version: int
    dirs: dict[str, Path]  # controller -> the mount under which our session directory goes (v2: one, key "")

    def session_dirs(self, session: str) -> list[Path]:
        return [d / session for d in self.dirs.values()]

    def rank_dirs(self, session: str, rank: int) -> dict[str, Path]:
        return {c: d / session / f"r{rank}" for c, d in self.dirs.items()}


def _mounts() -> list[tuple[str, Path, set[str]]]:
    """(fstype, mount point, options) of every cgroup mount."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[2], Path(parts[1]), set(parts[3].split(","))))
    return out


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def detect(root: Path = CGROUP_ROOT) -> tuple[Backend | None, str]:
    """The usable backend, or None and the reason in one line. v1 when its memory controller is mounted
    writable (as on our CI host, whose v2 hierarchy has no memory controller); else v2 with memory."""
    mounts = _mounts()
    v1 = {opt: mnt for fs, mnt, opts in mounts if fs == "cgroup" for opt in opts if opt in ("memory", "cpu", "blkio")}
    if "memory" in v1 and _writable(v1["memory"]):
        return Backend(1, {c: m for c, m in v1.items() if _writable(m)}), ""
    for fs, mnt, _ in mounts:
        if fs != "cgroup2":
            continue
        controllers = (mnt / "cgroup.controllers").read_text().split() if (mnt / "cgroup.controllers").is_file() else []
        if "memory" in controllers and _writable(mnt):
            return Backend(2, {"": mnt}), ""
    if not mounts:
        return None, "no cgroup file system is mounted"
    return None, "no writable cgroup hierarchy with a memory controller (need root, and cgroup v1 memory or v2)"


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _block_device(path: str) -> str | None:
    """'major:minor' of the disk that holds `path`, or None (overlay, tmpfs, network file systems).
    A partition is throttled through its whole disk, as blkio wants."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not node.exists():
        return None
    if (node / "partition").exists():  # throttle the whole disk
        return (node.resolve().parent / "dev").read_text().strip()
    return f"{os.major(dev)}:{os.minor(dev)}"


def create(backend: Backend, session: str, rank: int, device: DeviceProfile, disk_path: str) -> list[str]:
    """Make rank `rank`'s cgroups with the device's limits. Returns notes (limits that could not be set)."""
    notes = []
    dirs = backend.rank_dirs(session, rank)
    if backend.version == 2:
        top = backend.dirs[""] / session
        top.mkdir(exist_ok=True)
        wanted = ["memory", "cpu", "io"]
        available = (backend.dirs[""] / "cgroup.controllers").read_text().split()
        for parent in (backend.dirs[""], top):  # enable the controllers for the children
            for c in wanted:
                if c in available:
                    try:
                        _write(parent / "cgroup.subtree_control", f"+{c}")
                    except OSError:
                        pass
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    mem, cpu = device.memory_bytes, device.cpus
    if backend.version == 1:
        if mem is not None:
            _write(dirs["memory"] / "memory.limit_in_bytes", str(mem))
            if (dirs["memory"] / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                _write(dirs["memory"] / "memory.memsw.limit_in_bytes", str(mem))
        if cpu is not None:
            if "cpu" in dirs:
                _write(dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(dirs["cpu"] / "cpu.cfs_quota_us", str(int(cpu * CPU_PERIOD_US)))
            else:
                notes.append("CPU share not applied: the cgroup v1 cpu controller is not mounted writable")
    else:
        d = dirs[""]
        if mem is not None:
            _write(d / "memory.max", str(mem))
            if (d / "memory.swap.max").exists():
                _write(d / "memory.swap.max", "0")
        if cpu is not None:
            if (d / "cpu.max").exists():
                _write(d / "cpu.max", f"{int(cpu * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            else:
                notes.append("CPU share not applied: no cpu controller in the cgroup v2 hierarchy")
    if device.disk_read_bytes_s is not None:
        disk = _block_device(disk_path)
        rate = int(device.disk_read_bytes_s)
        if disk is None:
            notes.append(f"disk read rate not applied: {disk_path} is not on a block device (overlay, tmpfs?)")
        elif backend.version == 1 and "blkio" in dirs:
            _write(dirs["blkio"] / "blkio.throttle.read_bps_device", f"{disk} {rate}")
        elif backend.version == 2 and (dirs[""] / "io.max").exists():
            _write(dirs[""] / "io.max", f"{disk} rbps={rate}")
        else:
            notes.append("disk read rate not applied: no blkio (v1) or io (v2) controller")
    return notes


def join(backend: Backend, session: str, rank: int, pid: int = 0) -> None:
    for d in backend.rank_dirs(session, rank).values():
        _write(d / "cgroup.procs", str(pid or os.getpid()))


def current(pid: int = 0) -> dict[str, str]:
    """controller -> cgroup path of a process, from /proc/PID/cgroup ('' = the v2 hierarchy)."""
    out = {}
    for line in Path(f"/proc/{pid or 'self'}/cgroup").read_text().splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            out[c] = path
    return out


def leave(backend: Backend, original: dict[str, str]) -> None:
    """Move this process back to where it was (the wrapper, after starting the rank inside)."""
    for c, d in backend.dirs.items():
        path = original.get(c)
        if path is not None:
            try:
                _write(d / path.lstrip("/") / "cgroup.procs", str(os.getpid()))
            except OSError:
                pass  # stays in the rank's cgroup: harmless, a few MB


def oom_kills(backend: Backend, session: str, rank: int) -> int:
    """How many processes the kernel killed for exceeding rank `rank`'s memory cap."""
    d = backend.rank_dirs(session, rank)["memory" if backend.version == 1 else ""]
    name = "memory.oom_control" if backend.version == 1 else "memory.events"
    try:
        for line in (d / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except OSError:
        pass
    return 0


def memory_limit_of(pid: int = 0) -> int | None:
    """The memory cap the kernel applies to a process (its memory cgroup's limit); None when uncapped."""
    backend, _ = detect()
    if backend is None:
        return None
    key = "memory" if backend.version == 1 else ""
    path = current(pid).get(key)
    if path is None:
        return None
    d = backend.dirs[key] / path.lstrip("/")
    f = d / ("memory.limit_in_bytes" if backend.version == 1 else "memory.max")
    try:
        text = f.read_text().strip()
    except OSError:
        return None
    if text == "max" or int(text) >= 2**62:
        return None
    return int(text)


def processes(backend: Backend, session: str) -> list[int]:
    pids: set[int] = set()
    for top in backend.session_dirs(session):
        if top.is_dir():
            for procs in top.rglob("cgroup.procs"):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def destroy(backend: Backend, session: str, timeout: float = 10.0) -> list[str]:
    """Kill what is left in the session's cgroups (ranks of a crashed run) and remove them.
    Returns the directories that could not be removed."""
    for pid in processes(backend, session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left: list[str] = []
    deadline = time.monotonic() + timeout
    for top in backend.session_dirs(session):
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # A killed process leaves its cgroup only once the kernel has reaped it.
                    if time.monotonic() > deadline:
                        left.append(str(d))
                        break
                    time.sleep(0.05)
    return left


def list_session_dirs(backend: Backend | None, session: str) -> list[str]:
    if backend is None:
        return []
    return [str(d) for d in backend.session_dirs(session) if d.exists()]
