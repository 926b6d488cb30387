"""Bring an emulation session up and down: namespaces and shaped links, the delay daemon, per-rank cgroups.

`up` writes the state file first and tears down whatever it made if any step fails; `down` removes
everything a session can have made, found by name as well as through the state file, so it also cleans
up after a crashed `up` or a killed run. `leftovers` lists what is still there (the tests assert it empty).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tpi_mpi.emulate import cgroups, netns, state
from tpi_mpi.emulate.profiles import DeviceProfile, NetworkProfile
from tpi_mpi.errors import UserError

NEEDS_ROOT = ("emulated devices need root (network namespaces, tc, iptables, cgroups); without root use the "
              "software link model: mpirun -n N python -m tpi_mpi.run emulation.links=software "
              "network=wifi")


def _check_tools(use_netem: bool) -> None:
    for tool in ("ip", "tc", "nsenter") + (() if use_netem else ("iptables",)):
        if shutil.which(tool) is None:
            raise UserError(f"{tool} is not installed: apt-get install iproute2 iptables util-linux")
    if not use_netem:
        try:
            import netfilterqueue  # noqa: F401
        except ImportError:
            raise UserError("this kernel has no netem, and the delay daemon needs the netfilterqueue package: "
                            "apt-get install libnetfilter-queue-dev && pip install netfilterqueue") from None


def up(session: str, devices: int, network: NetworkProfile, device_profiles: list[DeviceProfile],
       allow_uncapped: bool = False, disk_path: str = ".", owner_pid: int | None = None) -> dict[str, Any]:
    """Create the session; returns its state. On any failure, removes what it made and re-raises.

    owner_pid: the process the session lives for (`run`, `check`), which removes it when it ends; if that
    process was killed before it could, the next `up` of the name removes the leftover (state.owner_is_gone).
    Without an owner (`up`) the session stays until `down`."""
    state.check_session(session)
    if os.geteuid() != 0:
        raise UserError(NEEDS_ROOT)
    if devices < 1:
        raise UserError(f"devices={devices}: need at least 1")
    if len(device_profiles) != devices:
        raise UserError(f"{len(device_profiles)} device profiles for devices={devices}: give one, or one per device")
    old = state.load(session)
    if old is not None and old.get("owner") is not None:
        if not state.owner_is_gone(old):
            raise UserError(f"session {session} is in use by pid {old['owner']['pid']} (a `run` or `check`): wait "
                            f"for it, or give another session=")
        left = down(session)
        print(f"tpi_mpi: emulate: session {session} was left by a process that was killed (pid "
              f"{old['owner']['pid']}): removed{'; still there: ' + '; '.join(left) if left else ''}",
              file=sys.stderr, flush=True)
    if state.load(session) is not None or netns.list_namespaces(session):
        raise UserError(f"session {session} is already up (or was not cleaned up): run "
                        f"python -m tpi_mpi.emulate down session={session}")
    use_netem = netns.has_netem()
    _check_tools(use_netem)
    capped = any(d.memory_bytes is not None or d.cpus is not None or d.disk_read_bytes_s is not None
                 for d in device_profiles)
    backend, why = cgroups.detect() if capped else (None, "")
    if capped and backend is None:
        if not allow_uncapped:
            raise UserError(f"cannot cap the devices: {why}; set allow_uncapped=true to go on without caps")
        print(f"tpi_mpi: emulate: no memory/CPU/disk caps ({why}); going on uncapped as allowed",
              file=sys.stderr, flush=True)
    st: dict[str, Any] = {
        "session": session, "status": "creating", "devices": devices, "created_at": time.time(),
        "network": {"name": network.name, "use_netem": use_netem,
                    "links": [{"latency_s": network.access(k).latency_s,
                               "bandwidth_bit_s": network.access(k).bandwidth_bit_s} for k in range(devices)]},
        "device_profiles": [asdict(d) for d in device_profiles],
        "cgroups": None if backend is None else {"version": backend.version,
                                                 "dirs": {c: str(d) for c, d in backend.dirs.items()}},
        "delayd_pid": None, "notes": [],
        "owner": None if owner_pid is None else state.process_identity(owner_pid),
    }
    state.save(session, st)
    try:
        netns.create(session, devices, network, use_netem)
        if not use_netem:
            st["delayd_pid"] = _start_delayd(session)
            state.save(session, st)
        if backend is not None:
            for k, dev in enumerate(device_profiles):
                for note in cgroups.create(backend, session, k, dev, disk_path):
                    if note not in st["notes"]:
                        st["notes"].append(note)
                        print(f"tpi_mpi: emulate: {note}", file=sys.stderr, flush=True)
        st["status"] = "up"
        state.save(session, st)
    except BaseException:
        down(session)
        raise
    return st


def backend_of(st: dict[str, Any]) -> cgroups.Backend | None:
    cg = st.get("cgroups")
    return None if cg is None else cgroups.Backend(cg["version"], {c: Path(d) for c, d in cg["dirs"].items()})


def _log_path(session: str) -> Path:
    return state.state_dir() / f"{session}.delayd.log"


def _start_delayd(session: str, timeout: float = 20.0) -> int:
    r, w = os.pipe()
    log = open(_log_path(session), "w")
    try:
        p = subprocess.Popen(["ip", "netns", "exec", netns.hub(session), sys.executable, "-m",
                              "tpi_mpi.emulate.delayd", "--queue", str(netns.QUEUE), "--ready-fd", str(w),
                              "--session", session],
                             stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(w,), start_new_session=True)
    finally:
        os.close(w)
        log.close()
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        line = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
    if line.strip() != b"ready":
        p.kill()
        p.wait()
        raise RuntimeError(f"the delay daemon did not start: {_log_path(session).read_text()[-2000:]}")
    return p.pid


def _delayd_pids(session: str) -> list[int]:
    """The delay daemons of this session, found by their command line (also when the state file is gone)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"tpi_mpi.emulate.delayd" in args and session.encode() in args:
            pids.append(int(proc.name))
    return pids


def _stop_delayd(session: str, timeout: float = 5.0) -> None:
    pids = _delayd_pids(session)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while Path(f"/proc/{pid}").exists() and _is_alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)


def _is_alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie waits for its parent (up, long gone or about to reap)


def down(session: str) -> list[str]:
    """Remove everything of the session. Returns what is left (empty when all went)."""
    state.check_session(session)
    st = state.load(session) or {}
    _stop_delayd(session)
    netns.destroy(session)
    backend = backend_of(st) if st else None
    if backend is None:
        backend, _ = cgroups.detect()
    if backend is not None:
        cgroups.destroy(backend, session)
    _log_path(session).unlink(missing_ok=True)
    state.remove(session)
    return leftovers(session)


def leftovers(session: str) -> list[str]:
    """Everything of the session that still exists: namespaces (with their links, qdiscs and iptables
    rules), cgroups, delay daemons, the state file."""
    left = [f"netns {n}" for n in netns.list_namespaces(session)]
    backend, _ = cgroups.detect()
    left += [f"cgroup {d}" for d in cgroups.list_session_dirs(backend, session)]
    left += [f"delay daemon pid {p}" for p in _delayd_pids(session) if _is_alive(p)]
    if state.state_path(session).exists():
        left.append(f"state file {state.state_path(session)}")
    return left
