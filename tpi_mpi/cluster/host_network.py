"""What a container network changes on the host, put back afterwards: podman's netavark turns on
net.ipv4.ip_forward and adds iptables chains (NETAVARK_*) and the rules that jump to them, and leaves
both behind when its networks are gone.

    host = HostNetwork()      # before: the sysctl and every rule and chain of the root namespace
    ...                       # containers come and go
    left = host.restore()     # the sysctl as it was; the rules and chains added since, removed
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
TABLES = ("filter", "nat", "mangle")


def _tools() -> list[str]:
    return [t for t in ("iptables", "ip6tables") if shutil.which(t)]


def rules(tool: str, table: str) -> list[str]:
    p = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True, timeout=30)
    return p.stdout.splitlines() if p.returncode == 0 else []


class HostNetwork:
    def __init__(self) -> None:
        self.forward = FORWARD.read_text().strip()
        self.before = {(tool, table): rules(tool, table) for tool in _tools() for table in TABLES}

    def restore(self) -> list[str]:
        """Put back what changed; returns what could not be (empty when all is as before)."""
        left = []
        if FORWARD.read_text().strip() != self.forward:
            FORWARD.write_text(self.forward)
        for (tool, table), before in self.before.items():
            now = rules(tool, table)
            chains = [line.split()[1] for line in now if line.startswith("-N ") and line not in before]
            for line in now:  # rules added to chains that were there before (those of new chains go with them)
                words = shlex.split(line)
                if words[0] == "-A" and line not in before and words[1] not in chains:
                    subprocess.run([tool, "-w", "-t", table, "-D", *words[1:]], capture_output=True, timeout=30)
            for flag in ("-F", "-X"):  # flush all first: new chains may jump to each other
                for chain in chains:
                    subprocess.run([tool, "-w", "-t", table, flag, chain], capture_output=True, timeout=30)
            after = rules(tool, table)
            left += [f"{tool} -t {table}: {line}" for line in after if line not in before]
            left += [f"{tool} -t {table}: removed {line}" for line in before if line not in after]
        if FORWARD.read_text().strip() != self.forward:
            left.append(f"net.ipv4.ip_forward is {FORWARD.read_text().strip()}, was {self.forward}")
        return left
