"""Device and network profiles (conf/device/*.yaml, conf/network/*.yaml), loaded and validated.

A device profile caps one rank: memory, CPU share, disk read rate. A network profile shapes the link of
every device to the hub (its "access link"), optionally different per device; the one-way latency from
device a to device b is (latency_a + latency_b) / 2 and the bandwidth min(bandwidth_a, bandwidth_b), so
with equal links every rank-to-rank link has exactly the profile's latency and bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpi_mpi.errors import UserError
from tpi_mpi.units import parse_size

CONF = Path(__file__).resolve().parents[2] / "conf"
def parse_bytes(value: Any, what: str) -> int | None:
    """'4GiB', '512MiB', '3GB', 1024 -> bytes; None/'null' -> None."""
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
        return None
    return parse_size(value, what, "4GiB, 512MiB or 3GB")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "uncapped"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int | None        # cgroup memory limit; None: uncapped
    cpus: float | None              # CPU share in cores of this host (cgroup quota); None: uncapped
    disk_read_bytes_s: int | None   # blkio / io read throttle; None: unthrottled
    description: str = ""

    def describe(self) -> str:
        cpu = "CPU uncapped" if self.cpus is None else f"{self.cpus:g} CPU"
        disk = "" if self.disk_read_bytes_s is None else f", disk {self.disk_read_bytes_s / 1e6:g} MB/s"
        return f"{self.name} (memory {human_bytes(self.memory_bytes)}, {cpu}{disk})"


@dataclass(frozen=True)
class Link:
    """One device's access link to the hub."""
    latency_s: float
    bandwidth_bit_s: float


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    default: Link
    per_device: dict[int, Link] = field(default_factory=dict)
    description: str = ""

    def access(self, rank: int) -> Link:
        return self.per_device.get(rank, self.default)

    def latency_s(self, src: int, dst: int) -> float:
        """One-way latency of a message from rank src to rank dst."""
        return (self.access(src).latency_s + self.access(dst).latency_s) / 2

    def bandwidth_bit_s(self, src: int, dst: int) -> float:
        return min(self.access(src).bandwidth_bit_s, self.access(dst).bandwidth_bit_s)


def _load_yaml(kind: str, name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = CONF / kind / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF / kind).glob("*.yaml"))
        raise UserError(f"unknown {kind}={name!r}: choose one of {', '.join(known)} (conf/{kind}/*.yaml)")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def _check_keys(data: dict[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key {what}.{unknown[0]}: known keys are {', '.join(sorted(known))}")


def _positive(value: Any, what: str, allow_zero: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}={value!r} is not a number") from None
    if x < 0 or (x == 0 and not allow_zero):
        raise UserError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return x


def device_from_dict(name: str, data: dict[str, Any]) -> DeviceProfile:
    _check_keys(data, {"name", "memory", "cpus", "disk_read", "description"}, "device")
    cpus = data.get("cpus")
    disk = parse_bytes(data.get("disk_read"), "device.disk_read")
    memory = parse_bytes(data.get("memory"), "device.memory")
    if memory is not None and memory < 16 * 2**20:
        raise UserError(f"device.memory={data.get('memory')} is below 16 MiB: a Python rank cannot start in it")
    return DeviceProfile(name=str(data.get("name", name)), memory_bytes=memory,
                         cpus=None if cpus is None else _positive(cpus, "device.cpus"),
                         disk_read_bytes_s=disk, description=str(data.get("description", "")))


def _link(data: dict[str, Any], what: str) -> Link:
    _check_keys(data, {"latency_ms", "bandwidth_mbit"}, what)
    if "latency_ms" not in data or "bandwidth_mbit" not in data:
        raise UserError(f"{what} needs latency_ms and bandwidth_mbit")
    return Link(latency_s=_positive(data["latency_ms"], f"{what}.latency_ms", allow_zero=True) / 1e3,
                bandwidth_bit_s=_positive(data["bandwidth_mbit"], f"{what}.bandwidth_mbit") * 1e6)


def network_from_dict(name: str, data: dict[str, Any]) -> NetworkProfile:
    _check_keys(data, {"name", "latency_ms", "bandwidth_mbit", "per_device", "description"}, "network")
    default = _link({k: data.get(k) for k in ("latency_ms", "bandwidth_mbit")}, "network")
    per_device = {}
    for rank, link in (data.get("per_device") or {}).items():
        merged = {"latency_ms": default.latency_s * 1e3, "bandwidth_mbit": default.bandwidth_bit_s / 1e6, **link}
        per_device[int(rank)] = _link(merged, f"network.per_device.{rank}")
    return NetworkProfile(name=str(data.get("name", name)), default=default, per_device=per_device,
                          description=str(data.get("description", "")))


def load_device(name: str, overrides: dict[str, Any] | None = None) -> DeviceProfile:
    return device_from_dict(name, {**_load_yaml("device", name), **(overrides or {})})


def load_network(name: str, overrides: dict[str, Any] | None = None) -> NetworkProfile:
    return network_from_dict(name, {**_load_yaml("network", name), **(overrides or {})})
