"""Container images without a registry: a Debian base made with debootstrap, then docker/Dockerfile FROM it.

    base:   debootstrap --variant=minbase --include=python3,python3-venv bookworm ROOTFS MIRROR
            (MIRROR: the Debian archive apt uses here), `tar | podman import` -> localhost/<name>-base:bookworm
    device: podman build -f docker/Dockerfile --build-arg BASE=<base> with the host's own pip options (index,
            extra indexes, find-links, CA bundle; the local folders they name mounted read-only), so that pip
            in the build finds what pip on the host finds: the CPU wheel of torch, the same mirrors.

The podman settings this needs go in a containers.conf of our own (CONTAINERS_CONF), never in /etc.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
RELEASE = "bookworm"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

# runc: crun 1.8 rejects a host with both cgroup v1 and v2 mounted. cgroupfs: no systemd needed. ulimits:
# podman's defaults exceed the hard limits of a root without CAP_SYS_RESOURCE (a container would not start).
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
"""


class PodmanUnavailable(Exception):
    """This machine cannot build or run the containers (one line: why)."""


def missing_requirement() -> str | None:
    """Why podman cannot run docker/compose.yaml here, or None."""
    if os.geteuid() != 0:
        return "needs root (podman with cgroupfs, debootstrap)"
    missing = [b for b in ("podman", "debootstrap", "runc", "netavark") if not _which(b)]
    if missing:
        return (f"not installed: {', '.join(missing)} (Debian: apt-get install podman debootstrap runc netavark "
                "aardvark-dns)")
    try:
        import podman_compose  # noqa: F401
    except ImportError:
        return "podman-compose is not installed (pip install podman-compose)"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(Path(d, name)) for d in ("/usr/sbin", "/usr/lib/podman")
                                       if Path(d, name).exists()), None)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, log: Path | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command; its output to `log` (appended) when given. Past `timeout` it is killed and fails."""
    out = open(log, "a") if log is not None else None
    t0 = time.monotonic()
    try:
        if out is not None:
            out.write(f"+ {shlex.join(cmd)}\n")
            out.flush()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out or subprocess.PIPE,
                           stderr=subprocess.STDOUT if out else subprocess.PIPE, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise PodmanUnavailable(f"{shlex.join(cmd[:3])} ... ran past {timeout:g} s") from None
    finally:
        if out is not None:
            out.write(f"# {time.monotonic() - t0:.1f} s: {shlex.join(cmd[:4])}\n")
            out.close()
    if check and p.returncode != 0:
        tail = log.read_text()[-2000:] if log is not None else (p.stderr or "")[-2000:]
        raise PodmanUnavailable(f"{shlex.join(cmd[:4])} ... failed (exit {p.returncode}): {tail.strip()}")
    return p


def debian_mirror(release: str = RELEASE) -> str:
    """The Debian archive apt uses here (its sources' URIs for `release`), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if release in fields.get("Suites", "").split() and "main" in fields.get("Components", "").split():
                return fields.get("URIs", "").split()[0]
    lists = [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))] if sources.is_dir() else []
    for path in lists:
        for line in path.read_text().splitlines() if path.is_file() else []:
            m = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)\s+(.*)$", line.strip())
            if m and m.group(2) == release and "main" in m.group(3).split():
                return m.group(1)
    return "http://deb.debian.org/debian"


def host_pip_options() -> tuple[list[str], list[str]]:
    """The index options the host's pip uses (`pip config list`: files and PIP_* variables) and the local
    paths they name (to be mounted at the same place in the build; a local index's parent folder, where its
    links point). The CA bundle is always passed: pip in
    a virtual environment otherwise trusts only its own certifi bundle."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         timeout=60).stdout
    values: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.([a-z-]+)='(.*)'$", line.strip())
        if m and m.group(1) in ("index-url", "extra-index-url", "find-links", "cert", "trusted-host", "no-index"):
            for v in m.group(2).split():
                if v not in values.setdefault(m.group(1), []):
                    values[m.group(1)].append(v)
    values["cert"] = values.get("cert", [])[-1:] or [CA_BUNDLE]
    options: list[str] = []
    mounts: list[str] = []
    for key, vs in values.items():
        if key == "no-index":
            options += ["--no-index"] if vs[-1].lower() in ("1", "true", "yes") else []
            continue
        for v in vs[-1:] if key in ("index-url", "cert") else vs:
            options += [f"--{key}", v]
            path = urlparse(v).path if v.startswith("file:") else v
            if key.endswith("index-url") and v.startswith("file:"):
                path = str(Path(path).parent)  # a local index (ROOT/simple) links to files beside it
            if path.startswith("/") and Path(path).exists() and path not in mounts:
                mounts.append(path)
    return options, mounts


def _mounts_below(path: Path) -> list[str]:
    real = str(path.resolve())
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((p for p in points if p == real or p.startswith(real + "/")), key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a root filesystem: first whatever is mounted below it (debootstrap mounts /proc and /sys in
    its target, and may leave them when it is killed), so that nothing outside it is touched."""
    for point in _mounts_below(path):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    if _mounts_below(path):
        raise PodmanUnavailable(f"could not unmount what is mounted below {path}: {_mounts_below(path)}")
    shutil.rmtree(path, ignore_errors=True)


def build_base(work: Path, tag: str, env: dict[str, str], log: Path) -> float:
    """debootstrap a minimal Debian with Python and import it as image `tag`; returns the seconds taken."""
    t0 = time.monotonic()
    rootfs = work / "rootfs"
    try:
        run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv", RELEASE, str(rootfs),
             debian_mirror()], timeout=900, log=log)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imp = subprocess.run(["podman", "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True,
                                 timeout=600, env={**os.environ, **env})
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imp.returncode != 0 or tar.returncode != 0:
            raise PodmanUnavailable(f"podman import {tag} failed: {imp.stderr.strip()[-2000:]}")
    finally:
        remove_tree(rootfs)
    return time.monotonic() - t0


def build_device(base: str, tag: str, env: dict[str, str], log: Path) -> float:
    """docker/Dockerfile FROM `base`, pip as the host's; one layer (no intermediate images left behind)."""
    t0 = time.monotonic()
    options, mounts = host_pip_options()
    volumes = [a for m in dict.fromkeys([CA_BUNDLE, *mounts]) for a in ("-v", f"{m}:{m}:ro")]
    opts = " ".join(options)  # the Dockerfile splits it on spaces (pip's own config lists are space-separated)
    run(["podman", "build", "--layers=false", "--pull=never", "-f", str(ROOT / "docker" / "Dockerfile"),
         "--build-arg", f"BASE={base}", "--build-arg", f"TORCH_PIP_OPTIONS={opts}", "--build-arg",
         f"PIP_OPTIONS={opts}", *volumes, "-t", tag, str(ROOT)], timeout=1800, env=env, log=log)
    return time.monotonic() - t0
