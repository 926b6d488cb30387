#!/usr/bin/env python3
"""Entrypoint of one emulated device (a container of docker/compose.yaml).

Every device says what its cgroup gives it (memory limit, CPU share: one line), shapes its own outgoing
link with tc netem, then runs sshd so that MPICH's mpirun can start its rank there. On a kernel without
netem (sch_netem), the rate is shaped with tbf and one line says that the delay (jitter, loss) is not
applied. The launcher device (rank 0) also waits for the others' sshd, writes the hostfile (one
rank per device, in DEVICES order) and runs `mpirun -launcher ssh -f HOSTFILE -n N python -m tpi_mpi.run`.

Set by the compose file (environment):
  DEVICE_ROLE       device | launcher
  DEVICE_IFACE      interface to shape (eth0)
  LINK_DELAY_MS     one-way delay added to every packet this device sends (0: none)
  LINK_JITTER_MS    +- jitter on that delay (0: none)
  LINK_RATE_MBIT    egress rate in Mbit/s (0: unlimited)
  LINK_LOSS_PCT     random loss in percent (0: none)
  DEVICES           launcher: the devices' host names in rank order, comma-separated (its own first)
  TPI_ARGS          launcher: Hydra overrides for tpi_mpi.run, quoted as in a shell
  PEER_TIMEOUT_S    launcher: how long to wait for the other devices' sshd (60)
  DRY_RUN=1         print the commands and the hostfile instead of running anything (outside a container)
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping


class BadEnv(Exception):
    """A wrong setting in the compose file: one line, exit 2."""


def _number(env: Mapping[str, str], name: str) -> float:
    raw = env.get(name, "0").strip() or "0"
    try:
        value = float(raw)
    except ValueError:
        raise BadEnv(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise BadEnv(f"{name}={raw} is negative")
    return value


def netem_commands(env: Mapping[str, str]) -> list[list[str]]:
    """The tc commands for this device's egress link: one netem qdisc, replaced if it exists."""
    iface = env.get("DEVICE_IFACE", "eth0")
    delay, jitter = _number(env, "LINK_DELAY_MS"), _number(env, "LINK_JITTER_MS")
    rate, loss = _number(env, "LINK_RATE_MBIT"), _number(env, "LINK_LOSS_PCT")
    if jitter and not delay:
        raise BadEnv("LINK_JITTER_MS needs LINK_DELAY_MS")
    if loss > 100:
        raise BadEnv(f"LINK_LOSS_PCT={loss:g} is over 100")
    opts: list[str] = []
    if delay:
        opts += ["delay", f"{delay:g}ms"] + ([f"{jitter:g}ms"] if jitter else [])
    if rate:
        opts += ["rate", f"{rate:g}mbit"]
    if loss:
        opts += ["loss", f"{loss:g}%"]
    if not opts:
        return []  # an unshaped link: leave the default qdisc alone
    return [["tc", "qdisc", "replace", "dev", iface, "root", "netem", *opts]]


def tbf_command(env: Mapping[str, str], mtu: int = 1500) -> list[str]:
    """The rate alone, with tbf (in every kernel): the bucket holds a packet and 1 ms at the rate, the queue
    ~250 ms, as tpi_mpi's own emulation shapes its links."""
    byte_s = _number(env, "LINK_RATE_MBIT") * 1e6 / 8
    burst = int(max(2 * (mtu + 14), byte_s * 1e-3))
    limit = int(max(4 * burst, byte_s * 0.25))
    return ["tc", "qdisc", "replace", "dev", env.get("DEVICE_IFACE", "eth0"), "root", "tbf", "rate",
            f"{_number(env, 'LINK_RATE_MBIT'):g}mbit", "burst", str(burst), "limit", str(limit)]


def shape(env: Mapping[str, str], dry: bool) -> None:
    """netem; where the kernel has none, tbf for the rate and one line saying what is not applied."""
    for cmd in netem_commands(env):
        print("+ " + shlex.join(cmd), flush=True)
        if dry:
            continue
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode == 0:
            continue
        if "unknown" not in p.stderr.lower():  # tc: "Specified qdisc kind is unknown." = no sch_netem
            raise subprocess.CalledProcessError(p.returncode, cmd, p.stdout, p.stderr)
        missing = [f"{k}={env[k]}" for k in ("LINK_DELAY_MS", "LINK_JITTER_MS", "LINK_LOSS_PCT")
                   if _number(env, k)]
        # One write: the container log keeps it one line beside the stdout lines around it.
        sys.stderr.write(f"tpi_mpi device: warning: this kernel has no netem qdisc: {', '.join(missing)} not "
                         "applied" + ("; the rate is shaped with tbf" if _number(env, "LINK_RATE_MBIT") else "") + "\n")
        sys.stderr.flush()
        if _number(env, "LINK_RATE_MBIT"):
            iface = env.get("DEVICE_IFACE", "eth0")
            tbf = tbf_command(env, int(open(f"/sys/class/net/{iface}/mtu").read()))
            print("+ " + shlex.join(tbf), flush=True)
            subprocess.run(tbf, check=True)


def _cgroup_file(controller: str, name: str) -> str | None:
    """A file of this container's cgroup: v2 (one hierarchy) or v1 (a directory per controller)."""
    for path in (f"/sys/fs/cgroup/{name}", f"/sys/fs/cgroup/{controller}/{name}"):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return None


def cgroup_line(host: str) -> str:
    """What this container's cgroup gives it, read back from the cgroup itself."""
    v2_mem, v2_cpu = _cgroup_file("", "memory.max"), _cgroup_file("", "cpu.max")
    if v2_mem is not None or v2_cpu is not None:
        memory, (quota, period) = v2_mem or "max", (v2_cpu or "max 100000").split()
    else:
        memory = _cgroup_file("memory", "memory.limit_in_bytes") or "?"
        quota = _cgroup_file("cpu", "cpu.cfs_quota_us") or "?"
        period = _cgroup_file("cpu", "cpu.cfs_period_us") or "?"
    share = f"{int(quota) / int(period):g} CPU" if quota.isdigit() and period.isdigit() else "no CPU cap"
    return (f"tpi_mpi device {host}: cgroup memory limit {memory} bytes, cpu quota {quota} / period {period} us "
            f"({share})")


def devices(env: Mapping[str, str]) -> list[str]:
    hosts = [h.strip() for h in env.get("DEVICES", "").split(",") if h.strip()]
    if not hosts:
        raise BadEnv("DEVICES is empty: list the devices' host names in rank order, e.g. device0,device1")
    if len(set(hosts)) != len(hosts):
        raise BadEnv(f"DEVICES={','.join(hosts)} names a device twice")
    return hosts


def hostfile(hosts: list[str]) -> str:
    """One slot per device: rank R runs on hosts[R]."""
    return "".join(f"{h}:1\n" for h in hosts)


def mpirun_command(env: Mapping[str, str], hosts: list[str], path: str) -> list[str]:
    iface = env.get("DEVICE_IFACE", "eth0")
    # MPICH over TCP on the shaped interface (its default netmod may pick another transport).
    wire = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": iface,
            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    genv = [a for k, v in wire.items() for a in ("-genv", k, env.get(k, v))]
    return ["mpirun", "-launcher", "ssh", "-f", path, "-n", str(len(hosts)), *genv,
            "python", "-m", "tpi_mpi.run", *shlex.split(env.get("TPI_ARGS", ""))]


def _wait_for_sshd(hosts: list[str], timeout: float) -> None:
    """Poll each device's port 22 until it answers (containers start in any order)."""
    deadline = time.monotonic() + timeout
    for host in hosts:
        while True:
            try:
                socket.create_connection((host, 22), timeout=2).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise BadEnv(f"device {host} has no sshd on port 22 after {timeout:g} s ({exc})") from None
                time.sleep(0.5)


def main(env: Mapping[str, str]) -> int:
    dry = env.get("DRY_RUN", "") == "1"
    role = env.get("DEVICE_ROLE", "device")
    if role not in ("device", "launcher"):
        raise BadEnv(f"DEVICE_ROLE={role!r}: choose device or launcher")

    def run(cmd: list[str]) -> None:
        print("+ " + shlex.join(cmd), flush=True)
        if not dry:
            subprocess.run(cmd, check=True)

    if not dry:
        print(cgroup_line(socket.gethostname()), flush=True)
    shape(env, dry)
    if role == "device":
        print("+ " + shlex.join(["/usr/sbin/sshd", "-D", "-e"]), flush=True)
        if dry:
            return 0
        os.execv("/usr/sbin/sshd", ["/usr/sbin/sshd", "-D", "-e"])  # PID 1 of the container from here
    hosts = devices(env)
    path = os.path.join(tempfile.gettempdir(), "tpi_hostfile")
    cmd = mpirun_command(env, hosts, path)
    run(["/usr/sbin/sshd"])  # rank 0's own proxy is started over ssh too
    if dry:
        print(f"# {path}\n{hostfile(hosts)}", end="", flush=True)
    else:
        _wait_for_sshd(hosts, _number(env, "PEER_TIMEOUT_S") or 60)
        with open(path, "w") as f:
            f.write(hostfile(hosts))
    print("+ " + shlex.join(cmd), flush=True)
    return 0 if dry else subprocess.run(cmd).returncode

if __name__ == "__main__":
    try:
        sys.exit(main(os.environ))
    except BadEnv as exc:
        print(f"tpi_mpi device: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as exc:
        print(f"tpi_mpi device: error: {shlex.join(exc.cmd)} failed with exit code {exc.returncode}"
              " (tc needs cap_add: NET_ADMIN and a kernel with sch_netem)", file=sys.stderr)
        sys.exit(exc.returncode or 1)
