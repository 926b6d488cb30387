"""Run docker/compose.yaml with podman on this machine, no registry needed; measure it; leave nothing.

    python -m tpi_mpi.cluster.podman [--work DIR] [--json FILE] [--image NAME] [--keep-images]

1. images (podman_images.py): a Debian base made with debootstrap, then the device image (docker/Dockerfile);
2. a tiny model with its tokenizer, split for the compose file's devices, in WORK/data (TPI_DEVICE_DATA);
3. `podman-compose up -d` of docker/compose.yaml as it is (TPI_DEVICE_IMAGE names our image); device0, the
   launcher, runs mpirun over ssh across the containers and exits when the generation is done; each
   container's log starts with what its cgroup gives it (memory limit, CPU quota), read from inside;
4. the rate between containers: a TCP stream from a device to another, timed by the receiver;
5. down: containers, pod, network, images and the root filesystem; net.ipv4.ip_forward and the iptables
   rules and chains that netavark added are put back as they were. --json gets the record, the logs, the
   limits, the rates and the time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tpi_mpi.cluster.host_network import HostNetwork
from tpi_mpi.cluster.podman_images import (
    CONTAINERS_CONF,
    ROOT,
    PodmanUnavailable,
    build_base,
    build_device,
    missing_requirement,
    remove_tree,
    run,
)

COMPOSE = ROOT / "docker" / "compose.yaml"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"

# The receiver of a rate measurement: bytes and seconds from the first byte to the last.
RECEIVER = """\
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 5001)); s.listen(1)
print("ready", flush=True)
c, _ = s.accept(); n = 0; t0 = t1 = None
while b := c.recv(1 << 20):
    t1 = time.monotonic(); t0 = t0 or t1; n += len(b)
print(n, t1 - t0, flush=True)
"""
SENDER = """\
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=30); c.sendall(bytes(int(sys.argv[2]))); c.close()
"""


def services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # resolves the `<<: *device` merge keys


def devices_in_rank_order() -> list[str]:
    launcher = next(s for s in services().values() if s["environment"]["DEVICE_ROLE"] == "launcher")
    return str(launcher["environment"]["DEVICES"]).split(",")


def parse_bytes(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    t = str(text).strip().lower().rstrip("b")
    return int(float(t[:-1]) * units[t[-1]]) if t[-1] in units else int(t)


class Stack:
    """One podman-compose project of docker/compose.yaml, named `name`."""

    def __init__(self, name: str, image: str, data: Path, env: dict[str, str], log: Path):
        self.name, self.log = name, log
        self.env = {**env, "TPI_DEVICE_IMAGE": image, "TPI_DEVICE_DATA": str(data)}

    def compose(self, *args: str, timeout: float = 300) -> None:
        run([sys.executable, "-m", "podman_compose", "-p", self.name, "-f", str(COMPOSE), *args], timeout=timeout,
            env=self.env, log=self.log)

    def podman(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return run(["podman", *args], timeout=timeout, env=self.env, check=check).stdout

    def containers(self) -> dict[str, str]:
        """service -> container name, for every container of the project (running or not)."""
        out = self.podman("ps", "-a", "--filter", f"label={PROJECT_LABEL}={self.name}", "--format", "json")
        return {c["Labels"][SERVICE_LABEL]: c["Names"][0] for c in json.loads(out or "[]")}

    def logs(self, container: str) -> str:
        """The container's output, stdout and stderr together."""
        return subprocess.run(["podman", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=60, env={**os.environ, **self.env}).stdout

    def rate(self, sender: str, receiver: str, nbytes: int) -> float:
        """bit/s of a TCP stream of `nbytes` from one container to another, timed by the receiver."""
        c = self.containers()
        rx = subprocess.Popen(["podman", "exec", c[receiver], "python3", "-c", RECEIVER], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                              env={**os.environ, **self.env})
        try:
            assert rx.stdout is not None
            if rx.stdout.readline().strip() != "ready":
                raise PodmanUnavailable(f"the rate receiver in {receiver} did not start: {rx.communicate()[1]}")
            run(["podman", "exec", c[sender], "python3", "-c", SENDER, receiver, str(nbytes)], timeout=120,
                env=self.env)
            got, seconds = rx.communicate(timeout=60)[0].split()
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait()
        if int(got) != nbytes:
            raise PodmanUnavailable(f"{receiver} received {got} of {nbytes} bytes from {sender}")
        return nbytes * 8 / float(seconds)

    def down(self) -> list[str]:
        """Remove the project's containers, pod and network; returns what is left (empty when all went)."""
        self.compose("down", "-t", "10", timeout=300)
        for container in self.containers().values():  # what compose down did not remove
            self.podman("rm", "-f", container, check=False)
        self.podman("pod", "rm", "-f", f"pod_{self.name}", check=False)
        self.podman("network", "rm", "-f", f"{self.name}_devnet", check=False)
        left = [f"container {c}" for c in self.containers().values()]
        nets = self.podman("network", "ls", "--format", "{{.Name}}").split()
        pods = self.podman("pod", "ps", "--format", "{{.Name}}").split()
        return left + [f"network {n}" for n in nets if n.startswith(self.name)] + \
            [f"pod {p}" for p in pods if self.name in p]


def cgroup_of(log: str) -> dict[str, Any]:
    """The entrypoint's first line: `... cgroup memory limit M bytes, cpu quota Q / period P us (...)`."""
    m = re.search(r"cgroup memory limit (\S+) bytes, cpu quota (\S+) / period (\S+) us", log)
    if m is None:
        return {}
    mem, quota, period = m.groups()
    return {"memory_limit_bytes": int(mem) if mem.isdigit() else None,
            "cpu_quota_us": int(quota) if quota.lstrip("-").isdigit() else None,
            "cpu_period_us": int(period) if period.isdigit() else None}


def make_data(data: Path, n: int) -> Path:
    """A tiny model with its tokenizer, split for the n devices (shards/rank_R), and results/."""
    from tpi_mpi.make_model import make_model
    from tpi_mpi.weights.split import split

    model = make_model(data / "model", "tiny", "llama", layers=2, seed=11)
    split(model, data / "shards", n)
    (data / "results").mkdir()
    return model


def main_run(work: Path, image: str | None, keep_images: bool, out: dict[str, Any]) -> None:
    name = f"tpipod{os.getpid()}"
    conf = work / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    env = {"CONTAINERS_CONF": str(conf)}
    log = work / "podman.log"
    out.update(name=name, log=str(log), timings_s={}, made_images=[])
    host = HostNetwork()
    base, device = f"localhost/{name}-base:bookworm", image or f"localhost/{name}-device:latest"
    stack = Stack(name, device, work / "data", env, log)
    try:
        hosts = devices_in_rank_order()
        out["model"] = str(make_data(work / "data", len(hosts)))
        if image is None:
            out["made_images"].append(base)
            out["timings_s"]["base_image"] = build_base(work, base, env, log)
            out["made_images"].append(device)
            out["timings_s"]["device_image"] = build_device(base, device, env, log)
        t0 = time.monotonic()
        stack.compose("up", "-d", "--no-build")
        out["timings_s"]["up"] = time.monotonic() - t0
        launcher = stack.containers()[hosts[0]]
        code = int(stack.podman("wait", launcher, timeout=900).split()[0])
        out["timings_s"]["generation"] = time.monotonic() - t0
        out["launcher_exit"] = code
        out["logs"] = {s: stack.logs(c) for s, c in stack.containers().items()}
        records = (work / "data" / "results" / "docker.jsonl").read_text().splitlines() if code == 0 else []
        out["record"] = json.loads(records[-1]) if records else None
        svc = services()
        out["devices"] = {s: {"mem_limit_bytes": parse_bytes(svc[s]["mem_limit"]), "cpus": float(svc[s]["cpus"]),
                              "rate_mbit": float(svc[s]["environment"]["LINK_RATE_MBIT"]),
                              "delay_ms": float(svc[s]["environment"]["LINK_DELAY_MS"]),
                              "cgroup": cgroup_of(out["logs"].get(s, ""))} for s in hosts}
        # The rate of what a device sends is its own egress shaping: time ~2 s of it, device to device.
        out["rates"] = []
        for sender, receiver in ((hosts[-1], hosts[1]), (hosts[1], hosts[2])):
            expected = out["devices"][sender]["rate_mbit"] * 1e6
            nbytes = int(expected * 2 / 8)
            out["rates"].append({"from": sender, "to": receiver, "expected_bit_s": expected,
                                 "bit_s": stack.rate(sender, receiver, nbytes), "bytes": nbytes})
    finally:
        t0 = time.monotonic()
        left = stack.down()
        if not keep_images:
            for img in out["made_images"]:
                run(["podman", "rmi", "-f", img], timeout=300, env=env, log=log, check=False)
            images = run(["podman", "images", "-a", "--format", "{{.Repository}}"], timeout=60, env=env).stdout
            left += [f"image {i}" for i in images.split() if name in i]
        left += host.restore()
        out["timings_s"]["down"] = time.monotonic() - t0
        out["left"] = left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", help="folder for the root filesystem, model, shards, results, logs (default: "
                                       "a temporary one, removed)")
    parser.add_argument("--json", help="write what was measured here")
    parser.add_argument("--image", help="an existing device image to run (nothing is built, it is kept)")
    parser.add_argument("--keep-images", action="store_true", help="keep the images built (a later --image)")
    args = parser.parse_args(argv)
    why = missing_requirement()
    if why:
        print(f"tpi_mpi: error: cannot run docker/compose.yaml with podman here: {why}", file=sys.stderr)
        return 2

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # `finally` removes what was made, as on Ctrl-C

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    out: dict[str, Any] = {}
    tmp = None if args.work else tempfile.mkdtemp(prefix="tpi_podman-")
    work = Path(args.work or tmp or ".").resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        main_run(work, args.image, args.keep_images, out)
    except PodmanUnavailable as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        if tmp is not None:
            remove_tree(Path(tmp))
    summary(out)
    return 0 if out.get("launcher_exit") == 0 and not out.get("left") else 1


def summary(out: dict[str, Any]) -> None:
    rec = out.get("record") or {}
    print(f"podman: {rec.get('world_size')} containers generated {rec.get('generated_tokens')} tokens "
          f"(launcher exit {out.get('launcher_exit')}); timings " +
          ", ".join(f"{k} {v:.0f} s" for k, v in out.get("timings_s", {}).items()))
    for host, d in out.get("devices", {}).items():
        cg = d["cgroup"]
        print(f"  {host}: memory limit {cg.get('memory_limit_bytes')} B (compose {d['mem_limit_bytes']}), cpu "
              f"{cg.get('cpu_quota_us')}/{cg.get('cpu_period_us')} us (compose cpus {d['cpus']:g})")
    for r in out.get("rates", []):
        print(f"  rate {r['from']} -> {r['to']}: {r['bit_s'] / 1e6:.1f} Mbit/s (shaped at "
              f"{r['expected_bit_s'] / 1e6:g})")
    print(f"  left behind: {out.get('left') or 'nothing'}")


if __name__ == "__main__":
    sys.exit(main())
