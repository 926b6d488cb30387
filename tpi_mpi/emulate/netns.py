"""Shaped links between ranks: a network namespace per rank, each with a veth to a bridge in a hub namespace.

    rank k's namespace <session>-r<k>: interface emu0, 10.250.0.(10+k)/24, tbf on egress = its uplink
    hub namespace <session>-hub:      bridge br0, port d<k> per rank, tbf on d<k>'s egress = k's downlink

Nothing is added to the root namespace; deleting the namespaces deletes their links, qdiscs and iptables
rules with them. Bandwidth: tc tbf on both ends of each veth. Latency: tc netem on the hub ports where the
kernel has it; otherwise (as on our CI kernel, which lacks netem) the delay daemon (delayd.py) holds every
bridged packet for the delay of its (input port, output port) pair, which iptables writes into the
packet's mark (in microseconds) on the hub's mangle FORWARD chain before NFQUEUE hands it over.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tpi_mpi.emulate.profiles import NetworkProfile
from tpi_mpi.errors import UserError

NETNS_DIR = Path("/var/run/netns")
IFACE = "emu0"  # the rank's interface, the same name in every rank namespace (FI_TCP_IFACE)
MTU = 9000  # fewer packets through the delay daemon; the shaping is by bytes, so the rates are unchanged
QUEUE = 0  # NFQUEUE number (per namespace)


def hub(session: str) -> str:
    return f"{session}-hub"


def rank_ns(session: str, rank: int) -> str:
    return f"{session}-r{rank}"


def address(rank: int) -> str:
    return f"10.250.0.{10 + rank}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    return p


def in_ns(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


def has_netem() -> bool:
    """Whether this kernel has the netem qdisc (tried on a dummy link in a throw-away namespace)."""
    ns = f"tpiprobe{os.getpid()}"  # no "-": never taken for a session's namespace
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        return sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms",
                  check=False).returncode == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def _shape(ns: str, dev: str, bit_s: float, delay_s: float | None) -> None:
    """tbf at `bit_s` on dev's egress; with `delay_s`, netem first (delay) and the tbf as its child."""
    byte_s = bit_s / 8
    # The bucket must hold a full packet and what the rate sends in 1 ms (tbf's timer granularity), no
    # more: a larger burst lets the start of each message through at line rate.
    burst = int(max(2 * (MTU + 14), byte_s * 1e-3))
    limit = int(max(4 * burst, byte_s * 0.25))  # ~250 ms of queue: no drops for the messages we send
    tbf = ["tbf", "rate", f"{int(bit_s)}bit", "burst", str(burst), "limit", str(limit)]
    if delay_s is None:
        in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf)
        return
    in_ns(ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", f"{delay_s * 1e6:.0f}us",
          "limit", "100000")
    in_ns(ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "2:", *tbf)  # netem's one child


def create(session: str, devices: int, net: NetworkProfile, use_netem: bool) -> None:
    """Build the hub and `devices` rank namespaces with their shaped links."""
    if devices > 200:
        raise UserError(f"devices={devices}: at most 200")
    h = hub(session)
    sh("ip", "netns", "add", h)
    sh("ip", "-n", h, "link", "set", "lo", "up")
    sh("ip", "-n", h, "link", "add", "br0", "mtu", str(MTU), "type", "bridge")
    sh("ip", "-n", h, "link", "set", "br0", "up")
    for k in range(devices):
        ns, port = rank_ns(session, k), f"d{k}"
        access = net.access(k)
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", h, "link", "add", port, "mtu", str(MTU), "type", "veth", "peer", "name", IFACE,
           "mtu", str(MTU), "netns", ns)
        sh("ip", "-n", h, "link", "set", port, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address(k)}/24", "dev", IFACE)
        sh("ip", "-n", ns, "link", "set", IFACE, "up")
        # An MPI connection is long-lived; without this, every idle spell between two messages (longer
        # than one retransmission timeout) sends TCP back to slow start, and big messages never reach the rate.
        in_ns(ns, "sysctl", "-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0")
        # With netem, half of a device's latency on its uplink and half on its downlink: a -> b then
        # takes (latency_a + latency_b) / 2, as the daemon path gives.
        half = access.latency_s / 2 if use_netem else None
        _shape(ns, IFACE, access.bandwidth_bit_s, half)  # uplink
        _shape(h, port, access.bandwidth_bit_s, half)  # downlink
    if not use_netem:
        _delay_rules(session, devices, net)


def _delay_rules(session: str, devices: int, net: NetworkProfile) -> None:
    h = hub(session)
    # br_netfilter hands bridged packets to iptables (per namespace on recent kernels).
    in_ns(h, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1")
    for a in range(devices):
        for b in range(devices):
            if a == b:
                continue
            delay_us = round(net.latency_s(a, b) * 1e6)
            in_ns(h, "iptables", "-t", "mangle", "-A", "FORWARD", "-m", "physdev", "--physdev-in", f"d{a}",
                  "--physdev-out", f"d{b}", "-j", "MARK", "--set-mark", str(delay_us))
    # --queue-bypass: until the daemon has bound the queue, packets pass undelayed rather than dropped.
    in_ns(h, "iptables", "-A", "FORWARD", "-m", "physdev", "--physdev-is-bridged", "-j", "NFQUEUE",
          "--queue-num", str(QUEUE), "--queue-bypass")


def set_link(session: str, rank: int, up: bool) -> None:
    """Cut (up=False) or mend rank `rank`'s link: its port on the hub's bridge goes down or up.

    Like a device losing its radio link: the rank's own end sees the carrier go, both directions stop, and
    its TCP connections retransmit (with exponential backoff, as across a real cut) until the link is back
    or the watchdog ends the job. The link's qdiscs stay configured while it is down.
    """
    port, h = f"d{rank}", hub(session)
    if not (NETNS_DIR / h).exists():
        raise UserError(f"session {session} is not up: no namespace {h}")
    if sh("ip", "-n", h, "link", "show", port, check=False).returncode != 0:
        raise UserError(f"session {session} has no rank {rank} (no port {port} on its hub)")
    sh("ip", "-n", h, "link", "set", port, "up" if up else "down")


def list_namespaces(session: str) -> list[str]:
    """This session's namespaces (all of them, when session is '')."""
    p = sh("ip", "netns", "list", check=False)
    names = [line.split()[0] for line in p.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(f"{session}-")]


def destroy(session: str) -> list[str]:
    """Delete every namespace of the session (their links, qdiscs and iptables rules go with them).
    Returns what could not be deleted."""
    left = []
    for ns in list_namespaces(session):
        if sh("ip", "netns", "del", ns, check=False).returncode != 0 and (NETNS_DIR / ns).exists():
            left.append(ns)
    return left
