"""Emulated edge devices: `python -m tpi_mpi.emulate COMMAND [key=value ...] [-- ...]`.

    up     network=wifi device=paper devices=8 [session=tpiemu] [allow_uncapped=false] [disk_path=.]
           then: mpirun -n 8 python -m tpi_mpi.emulate.rank --session tpiemu -- python -m tpi_mpi.run ...
    down   [session=tpiemu]             remove everything of the session (also after a crash)
    status [session=tpiemu]             what the session has (and what is left of it)
    run    network=... device=... devices=N [timeout=S] -- <tpi_mpi.run overrides>
           up, mpirun -n N tpi_mpi.run through the wrapper, down (always: also on failure and Ctrl-C)
    cut    rank=K [session=tpiemu]      cut rank K's link (its hub port down): a device losing its link
    mend   rank=K [session=tpiemu]      bring it back (its connections resume, retransmitting)
    check  network=... device=... devices=N [links=shaped|software] [json=FILE] [tolerance=0.15]
           measure per-link latency and bandwidth (MPI ping-pong) and the per-rank caps; print a table

Profiles: conf/network/*.yaml, conf/device/*.yaml; override a field with network.latency_ms=1,
network.bandwidth_mbit=100, device.memory=512MiB, device.cpus=0.5, ...; device=a,b,c gives one profile
per device. Shaped links and caps need root; `links=software` (check) and `emulation.links=software`
(tpi_mpi.run) model the links in software instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tpi_mpi.emulate import netns, state
from tpi_mpi.emulate import session as sess
from tpi_mpi.emulate.profiles import DeviceProfile, NetworkProfile, load_device, load_network
from tpi_mpi.errors import UserError, main_guard

COMMANDS = ("up", "down", "status", "run", "check", "cut", "mend")
KEYS = {"session", "network", "device", "devices", "allow_uncapped", "disk_path", "timeout", "links", "json",
        "tolerance", "rank"}


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def parse(args: list[str]) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[str]]:
    """key=value pairs (and network.X / device.X overrides) before `--`, the rest after it."""
    rest: list[str] = []
    if "--" in args:
        args, rest = args[:args.index("--")], args[args.index("--") + 1:]
    opts: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {"network": {}, "device": {}}
    for a in args:
        key, eq, value = a.partition("=")
        if not eq:
            raise UserError(f"expected key=value, got {a!r}")
        group, dot, field = key.partition(".")
        if dot and group in overrides:
            overrides[group][field] = _value(value)
        elif key in KEYS:
            opts[key] = value
        else:
            raise UserError(f"unknown key {key!r}: known are {', '.join(sorted(KEYS))}, network.FIELD, device.FIELD")
    return opts, overrides, rest


def _bool(opts: dict[str, Any], key: str) -> bool:
    value = str(opts.get(key, "false")).lower()
    if value not in ("true", "false"):
        raise UserError(f"{key}={value}: true or false")
    return value == "true"


def profiles(opts: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> tuple[int, NetworkProfile,
                                                                                 list[DeviceProfile]]:
    try:
        devices = int(opts.get("devices", 8))
    except ValueError:
        raise UserError(f"devices={opts['devices']}: a number") from None
    if devices < 1:
        raise UserError(f"devices={devices}: at least 1 (one rank per device)")
    network = load_network(str(opts.get("network", "wifi")), overrides["network"])
    names = str(opts.get("device", "paper")).split(",")
    if len(names) not in (1, devices):
        raise UserError(f"device= names {len(names)} profiles for devices={devices}: give one, or one per device")
    per = [load_device(n, overrides["device"]) for n in names]
    for d in per:
        check_fits_machine(d)
    return devices, network, per * devices if len(per) == 1 else per


def check_fits_machine(d: DeviceProfile) -> None:
    """A cap larger than this machine would not cap anything: the emulated device would be this host."""
    cores = len(os.sched_getaffinity(0))
    ram = psutil.virtual_memory().total
    if d.cpus is not None and d.cpus > cores:
        raise UserError(f"device {d.name}: cpus={d.cpus:g} is more than this machine's {cores} cores: "
                        "lower device.cpus")
    if d.memory_bytes is not None and d.memory_bytes > ram:
        raise UserError(f"device {d.name}: memory={d.memory_bytes / 2**30:.1f} GiB is more than this machine's "
                        f"{ram / 2**30:.1f} GiB: lower device.memory")


def _mpirun() -> str:
    return str(Path(sys.executable).with_name("mpirun"))


def _wrapped(session: str, devices: int, cmd: list[str]) -> list[str]:
    return [_mpirun(), "-n", str(devices), sys.executable, "-m", "tpi_mpi.emulate.rank", "--session", session,
            "--", sys.executable, *cmd]


def _run_mpirun(cmd: list[str], timeout: float | None) -> int:
    """mpirun in the foreground; on Ctrl-C or SIGTERM it is stopped, and the caller tears down."""
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"tpi_mpi: error: mpirun ran past timeout={timeout:g}s; stopped", file=sys.stderr, flush=True)
        return 124
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)  # mpirun passes it on to the ranks
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _teardown(session: str) -> None:
    left = sess.down(session)
    if left:
        print(f"tpi_mpi: error: session {session} left behind: {'; '.join(left)}", file=sys.stderr, flush=True)


def cmd_up(opts: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> int:
    session = state.check_session(str(opts.get("session", "tpiemu")))
    devices, network, devs = profiles(opts, overrides)
    st = sess.up(session, devices, network, devs, _bool(opts, "allow_uncapped"), str(opts.get("disk_path", ".")))
    _describe(st)
    print(f"\nrun:  mpirun -n {devices} python -m tpi_mpi.emulate.rank --session {session} -- python -m tpi_mpi.run "
          f"emulation.links=shaped network={network.name} device={devs[0].name} threads=1 ...\n"
          f"then: python -m tpi_mpi.emulate down session={session}")
    return 0


def _describe(st: dict[str, Any]) -> None:
    net = st["network"]
    how = "netem" if net["use_netem"] else "tbf + NFQUEUE delay daemon"
    print(f"session {st['session']}: {st['devices']} devices, network {net['name']} ({how}), "
          f"cgroups {'v' + str(st['cgroups']['version']) if st['cgroups'] else 'none (uncapped)'}")
    for k, (link, dev) in enumerate(zip(net["links"], st["device_profiles"], strict=True)):
        d = DeviceProfile(**dev)
        print(f"  rank {k}: {d.describe()}, link {link['latency_s'] * 1e3:g} ms one-way (to hub and back: "
              f"device to device = mean of both ends), {link['bandwidth_bit_s'] / 1e6:g} Mbit/s")


def cmd_down(opts: dict[str, Any]) -> int:
    session = state.check_session(str(opts.get("session", "tpiemu")))
    if os.geteuid() != 0:
        raise UserError(sess.NEEDS_ROOT)
    left = sess.down(session)
    if left:
        print(f"tpi_mpi: error: could not remove: {'; '.join(left)}", file=sys.stderr)
        return 1
    print(f"session {session}: down, nothing left")
    return 0


def cmd_status(opts: dict[str, Any]) -> int:
    session = state.check_session(str(opts.get("session", "tpiemu")))
    st = state.load(session)
    if st is not None:
        _describe(st)
    left = sess.leftovers(session)
    print("\n".join(left) if left else f"session {session}: nothing exists")
    return 0


def cmd_link(opts: dict[str, Any], up: bool) -> int:
    session = state.check_session(str(opts.get("session", "tpiemu")))
    if os.geteuid() != 0:
        raise UserError(sess.NEEDS_ROOT)
    try:
        rank = int(opts["rank"])
    except (KeyError, ValueError):
        raise UserError(f"{'mend' if up else 'cut'} needs rank=K (a number)") from None
    netns.set_link(session, rank, up)
    print(f"session {session}: rank {rank}'s link {'mended' if up else 'cut'}", flush=True)
    return 0


def _timeout(opts: dict[str, Any], default: float | None) -> float | None:
    t = opts.get("timeout")
    return default if t is None else float(t)


def _with_signals_as_exit() -> None:
    """SIGTERM (and SIGHUP) become SystemExit, so that `finally: down` runs, as it does on Ctrl-C."""
    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


def cmd_run(opts: dict[str, Any], overrides: dict[str, dict[str, Any]], rest: list[str]) -> int:
    session = state.check_session(str(opts.get("session", "tpiemu")))
    devices, network, devs = profiles(opts, overrides)
    _with_signals_as_exit()
    sess.up(session, devices, network, devs, _bool(opts, "allow_uncapped"), str(opts.get("disk_path", ".")),
            owner_pid=os.getpid())
    try:
        # The record says what it ran on: the same profiles, with the same overrides.
        labels = ["emulation.links=shaped", f"network={network.name}",
                  *(f"network.{k}={v}" for k, v in overrides["network"].items())]
        if len({d.name for d in devs}) == 1:
            labels += [f"device={devs[0].name}", *(f"device.{k}={v}" for k, v in overrides["device"].items())]
        if not any(r.startswith("threads=") for r in rest):
            # MPICH on the wire sees each rank as alone on its node, so tpi_mpi.run would give every rank
            # all the cores; they all share this host's.
            labels.append(f"threads={max(1, len(os.sched_getaffinity(0)) // devices)}")
        return _run_mpirun(_wrapped(session, devices, ["-m", "tpi_mpi.run", *rest, *labels]), _timeout(opts, None))
    finally:
        _teardown(session)


def cmd_check(opts: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> int:
    from tpi_mpi.emulate.check import large_message_bytes, table

    session = state.check_session(str(opts.get("session", "tpiemu")))
    devices, network, devs = profiles(opts, overrides)
    if devices < 2:
        raise UserError("check needs devices >= 2 (it measures the links from rank 0)")
    links = str(opts.get("links", "shaped"))
    if links not in ("shaped", "software"):
        raise UserError(f"links={links}: shaped or software")
    tolerance = float(opts.get("tolerance", 0.15))
    expected = [{"latency_s": network.latency_s(0, k), "bandwidth_bit_s": network.bandwidth_bit_s(0, k)}
                for k in range(devices)]
    large = ",".join(str(large_message_bytes(e["bandwidth_bit_s"])) for e in expected)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "check.json"
        worker = ["-m", "tpi_mpi.emulate.check", "--out", str(out), "--large-bytes", large]
        timeout = _timeout(opts, 300)
        if links == "software":
            worker += ["--software", str(opts.get("network", "wifi")), "--overrides", json.dumps(overrides["network"])]
            code = _run_mpirun([_mpirun(), "-n", str(devices), sys.executable, *worker], timeout)
        else:
            _with_signals_as_exit()
            sess.up(session, devices, network, devs, _bool(opts, "allow_uncapped"),
                    str(opts.get("disk_path", ".")), owner_pid=os.getpid())
            try:
                code = _run_mpirun(_wrapped(session, devices, worker), timeout)
            finally:
                _teardown(session)
        if code != 0:
            print(f"tpi_mpi: error: the check's mpirun failed (exit {code})", file=sys.stderr)
            return code
        measured = json.loads(out.read_text())
    if links == "software":  # caps are not applied by the software model: show what the profile would be
        devs_shown = [{**d.__dict__, "memory_bytes": None, "cpus": None} for d in devs]
    else:
        devs_shown = [d.__dict__ for d in devs]
    text, ok = table(measured, expected, devs_shown, tolerance)
    print(f"network {network.name} ({links} links), devices {devs[0].name}, N={devices} | load avg before "
          f"{load_before:.2f}\n{text}\nall within ±{tolerance:.0%} of the profile: {'yes' if ok else 'NO'}")
    if opts.get("json"):
        from tpi_mpi.results import write_json_atomic

        write_json_atomic(opts["json"], {"network": network.name, "links_mode": links, "devices": devices,
                                         "device_profiles": devs_shown, "expected_links": expected, **measured,
                                         "within_tolerance": ok, "tolerance": tolerance,
                                         "load_avg_before": load_before, "timestamp": time.time()})
    return 0


@main_guard
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command = argv.pop(0)
    try:
        opts, overrides, rest = parse(argv)
        if rest and command != "run":
            raise UserError(f"only `run` takes arguments after --, not {command}")
        if command == "up":
            return cmd_up(opts, overrides)
        if command == "down":
            return cmd_down(opts)
        if command == "status":
            return cmd_status(opts)
        if command == "run":
            return cmd_run(opts, overrides, rest)
        if command in ("cut", "mend"):
            return cmd_link(opts, command == "mend")
        return cmd_check(opts, overrides)
    except UserError as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("tpi_mpi: interrupted; the session was torn down", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
