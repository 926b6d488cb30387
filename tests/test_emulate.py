"""Edge-device emulation: profiles, the software link model, and (as root, with iptables and the
netfilterqueue package, or netem) shaped links, memory caps and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, kill_tree, mpirun

from tpi_mpi.emulate import cgroups, netns
from tpi_mpi.emulate import session as sess
from tpi_mpi.emulate import state as emu_state
from tpi_mpi.emulate.profiles import load_device, load_network, parse_bytes
from tpi_mpi.errors import UserError
from tpi_mpi.make_model import make_model
from tpi_mpi.weights.split import split

EMULATE = [sys.executable, "-m", "tpi_mpi.emulate"]
TOLERANCE = 0.15
# The delay daemon's own cost per packet (NFQUEUE to Python and back), absolute. On a 2-core host at 2.0 GHz a 1 ms
# link measured 1.20 ms in one suite and 1.30 ms in CI with a load average of 3.4 (2 December 2026); within 15 % on
# a faster host before. 0.5 ms still fails a link with no delay at all (~0.05 ms here) or twice the delay.
LATENCY_SLACK_S = 0.5e-3


def _can_shape() -> str | None:
    """Why shaped links cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tc, iptables, cgroups)"
    for tool in ("ip", "tc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not netns.has_netem():
        if shutil.which("iptables") is None:
            return "no netem in this kernel and no iptables for the delay daemon"
        try:
            import netfilterqueue  # noqa: F401
        except ImportError:
            return "no netem in this kernel and no netfilterqueue package for the delay daemon"
    return None


NO_SHAPING = _can_shape()
needs_shaping = pytest.mark.skipif(NO_SHAPING is not None, reason=str(NO_SHAPING))


def emulate(args: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*EMULATE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"python -m tpi_mpi.emulate {' '.join(args)} hung for {timeout}s:\n{exc.stderr}")


def root_namespace_snapshot() -> dict[str, str]:
    """What the root namespace has that a session must not change: links, qdiscs, iptables rules."""
    snap = {"links": subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout,
            "qdiscs": subprocess.run(["tc", "qdisc"], capture_output=True, text=True).stdout}
    if shutil.which("iptables"):
        for table in ("filter", "mangle"):
            snap[table] = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout
    # ifindex counters differ between snapshots; compare the names only
    snap["links"] = "\n".join(sorted(re.findall(r"^\d+: ([^:@]+)", snap["links"], re.M)))
    return snap


@pytest.fixture
def session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh session name with its own state directory; whatever happens in the test, it is torn down
    afterwards and nothing of it may be left (namespaces, links, qdiscs, rules, cgroups, daemons)."""
    name = f"t{os.getpid() % 100000}"
    monkeypatch.setenv("TPI_MPI_EMU_STATE_DIR", str(tmp_path / "state"))
    before = root_namespace_snapshot()
    try:
        yield name
    finally:
        left = sess.down(name)
        assert left == [], f"left behind: {left}"
        assert root_namespace_snapshot() == before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-layer tiny model and its split for 2 ranks, shared by the generation tests."""
    root = tmp_path_factory.mktemp("emu")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=3)
    return model, split(model, root / "shards", 2)


# --- profiles (no root) ---------------------------------------------------------------------------------

def test_every_profile_loads() -> None:
    for kind in ("device", "network"):
        names = sorted(p.stem for p in (ROOT / "conf" / kind).glob("*.yaml"))
        assert {"paper"} <= set(names)
        for name in names:
            (load_device if kind == "device" else load_network)(name)
    assert load_device("raspberry-pi-4").memory_bytes == 4 * 2**30
    wifi = load_network("wifi", {"per_device": {2: {"latency_ms": 13, "bandwidth_mbit": 10}}})
    assert wifi.latency_s(0, 1) == pytest.approx(0.003)
    assert wifi.latency_s(0, 2) == pytest.approx((0.003 + 0.013) / 2)
    assert wifi.bandwidth_bit_s(2, 0) == pytest.approx(10e6)


@pytest.mark.parametrize("bad", [{"memory": "lots"}, {"memory": "1MiB"}, {"cpus": -1}, {"colour": "red"}])
def test_bad_device_profile_is_one_line(bad: dict) -> None:
    with pytest.raises(UserError) as e:
        load_device("paper", bad)
    assert "\n" not in str(e.value)


def test_sizes() -> None:
    assert parse_bytes("512MiB", "x") == 512 * 2**20
    assert parse_bytes("3GB", "x") == 3 * 10**9
    assert parse_bytes(None, "x") is None


def test_unknown_profile_and_no_root_message() -> None:
    p = emulate(["check", "network=nonesuch", "devices=2"])
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "unknown network='nonesuch'" in p.stderr


def test_without_root_one_line_pointing_to_the_software_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError) as e:
        sess.up("tnoroot", 2, load_network("wifi"), [load_device("paper")] * 2)
    assert "need root" in str(e.value) and "emulation.links=software" in str(e.value) and "\n" not in str(e.value)


# --- software link model (no root) ------------------------------------------------------------------------

def test_software_links_deliver_after_latency_plus_bytes(tmp_path: Path) -> None:
    """Ping-pong through the software model: one-way latency and bandwidth as modelled, never earlier."""
    out = tmp_path / "check.json"
    p = emulate(["check", "links=software", "network=wifi", "network.latency_ms=10", "network.bandwidth_mbit=50",
                 "devices=2", f"json={out}"])
    assert p.returncode == 0, p.stderr
    link = json.loads(out.read_text())["links"][0]
    assert 0.010 <= link["latency_s"] <= 0.010 * (1 + TOLERANCE)
    assert abs(link["bandwidth_bit_s"] / 50e6 - 1) <= TOLERANCE


def test_software_links_in_a_run_are_labelled_and_slow_the_allreduce(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, shards = tiny
    p = mpirun(2, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/hydra", f"model.path={model}",
                   f"model.shards={shards}", "prompt_ids=[1,2,3]", "generation.max_new_tokens=4",
                   f"output.json={tmp_path}/r.json", "output.results=null", "emulation.links=software",
                   "network=4g"], timeout=120)
    assert p.returncode == 0, p.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["links"] == "software" and record["network"] == "4g"
    assert record["config"]["network"]["default"]["latency_s"] == 0.025
    ar = record["ranks"][1]["allreduce"]
    # star on 2 ranks: each allreduce is a message there and one back, 25 ms each way on 4g
    assert ar["seconds"] >= ar["calls"] * 2 * 0.025


# --- shaped links (root) ----------------------------------------------------------------------------------

@needs_shaping
@pytest.mark.parametrize("latency_ms,bandwidth_mbit", [(1, 100), (5, 50), (10, 10)])
def test_shaped_links_give_the_profile(session: str, tmp_path: Path, latency_ms: float, bandwidth_mbit: float) -> None:
    out = tmp_path / "check.json"
    p = emulate(["check", f"session={session}", "network=wifi", f"network.latency_ms={latency_ms}",
                 f"network.bandwidth_mbit={bandwidth_mbit}", "device=paper", "devices=2", f"json={out}"])
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    link = result["links"][0]
    # The latency may be off by TOLERANCE or by LATENCY_SLACK_S, whichever is more: without netem each packet goes
    # through the userspace delay daemon, a fixed cost that is a large part of a 1 ms profile.
    assert abs(link["latency_s"] - latency_ms / 1e3) <= max(TOLERANCE * latency_ms / 1e3, LATENCY_SLACK_S), p.stdout
    assert abs(link["bandwidth_bit_s"] / (bandwidth_mbit * 1e6) - 1) <= TOLERANCE, p.stdout
    # each rank saw its device's memory cap from inside
    assert [r["memory_limit_bytes"] for r in result["ranks"]] == [load_device("paper").memory_bytes] * 2


@needs_shaping
def test_rank_over_its_memory_cap_is_one_line(session: str, tmp_path: Path) -> None:
    if cgroups.detect()[0] is None:
        pytest.skip(f"no usable cgroups: {cgroups.detect()[1]}")
    dev = load_device("raspberry-pi-4", {"memory": "64MiB"})
    sess.up(session, 2, load_network("ethernet"), [dev, dev])
    hog = tmp_path / "hog.py"
    hog.write_text("import os\nimport numpy\nif os.environ['PMI_RANK'] == '1':\n"
                   "    a = numpy.ones(512 * 2**20 // 8)\n")
    p = subprocess.run([str(Path(sys.executable).with_name("mpirun")), "-n", "2", sys.executable, "-m",
                        "tpi_mpi.emulate.rank", "--session", session, "--", sys.executable, str(hog)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       env={**os.environ, "TPI_MPI_EMU_STATE_DIR": os.environ["TPI_MPI_EMU_STATE_DIR"]})
    assert p.returncode != 0
    lines = [line for line in p.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert lines == ["tpi_mpi: error: rank 1 (device raspberry-pi-4) exceeded its memory cap of 64 MiB and was "
                     "killed by the kernel"], p.stderr


@needs_shaping
def test_up_that_fails_midway_leaves_nothing(session: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: object, **_k: object) -> list[str]:
        raise RuntimeError("injected failure after the links were made")

    monkeypatch.setattr(cgroups, "create", broken)
    with pytest.raises(RuntimeError, match="injected"):
        sess.up(session, 3, load_network("wifi"), [load_device("paper")] * 3)
    assert sess.leftovers(session) == []


@needs_shaping
def test_killed_launcher_then_down_leaves_nothing(session: str, tmp_path: Path) -> None:
    """`run` killed with SIGKILL mid-run (no chance to clean up): `down` removes everything."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen([*EMULATE, "run", f"session={session}", "network=wifi", "device=paper",
                                 "devices=2", "--", "model.path=/nonexistent"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (Path(os.environ["TPI_MPI_EMU_STATE_DIR"]) / f"{session}.json").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, "the session never came up"
            time.sleep(0.05)
        while netns.list_namespaces(session) == [] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    p = emulate(["down", f"session={session}"])
    assert p.returncode == 0, p.stderr
    assert sess.leftovers(session) == []


@needs_shaping
def test_session_of_a_killed_launcher_is_removed_by_the_next_run(session: str) -> None:
    """`run` killed with SIGKILL leaves its session; the next `run` of that name sees that the owner is gone,
    removes the leftover and goes on (here to the bad model path's one line), leaving nothing behind."""
    args = [*EMULATE, "run", f"session={session}", "network=wifi", "device=paper", "devices=2", "--",
            "model.path=/nonexistent"]
    launcher = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not any(n.endswith("-r1") for n in netns.list_namespaces(session)):
            assert launcher.poll() is None and time.monotonic() < deadline, "the session never came up"
            time.sleep(0.05)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
    assert sess.leftovers(session) != []  # SIGKILL gave it no chance to clean up
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert f"session {session} was left by a process that was killed (pid {launcher.pid}): removed" in again.stderr
    assert again.returncode != 0 and "/nonexistent" in again.stderr, again.stderr
    assert sess.leftovers(session) == []


def test_owner_of_a_session_is_told_from_a_reused_pid() -> None:
    me = emu_state.process_identity(os.getpid())
    assert me is not None and not emu_state.owner_is_gone({"owner": me})
    assert emu_state.owner_is_gone({"owner": {**me, "start": str(int(me["start"]) - 1)}})  # same pid, another process
    done = subprocess.Popen(["true"])
    done.wait()
    assert emu_state.process_identity(done.pid) is None
    assert not emu_state.owner_is_gone({"owner": None}) and not emu_state.owner_is_gone({})  # `up`: no owner


@needs_shaping
def test_ctrl_c_tears_down(session: str) -> None:
    """Ctrl-C (SIGINT) to `run` while its ranks start: it stops mpirun and removes everything itself."""
    launcher = subprocess.Popen([*EMULATE, "run", f"session={session}", "network=wifi", "device=paper",
                                 "devices=2", "--", "model.path=/nonexistent"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(n.endswith("-r1") for n in netns.list_namespaces(session)):
            assert launcher.poll() is None and time.monotonic() < deadline, "the session never came up"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert sess.leftovers(session) == [], err


@needs_shaping
def test_generation_on_shaped_links_is_labelled(session: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, shards = tiny
    p = emulate(["run", f"session={session}", "network=wifi", "device=paper", "devices=2", "timeout=120", "--",
                 f"hydra.run.dir={tmp_path}/hydra", f"model.path={model}", f"model.shards={shards}",
                 "prompt_ids=[1,2,3]", "generation.max_new_tokens=4", f"output.json={tmp_path}/r.json",
                 "output.results=null"], timeout=180)
    assert p.returncode == 0, p.stderr
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["links"] == "shaped" and record["generated_tokens"] == 4
    assert (record["network"], record["device"]) == ("wifi", "paper")


# --- cgroup v2 (files only: this host's v2 hierarchy has no memory controller) ----------------------------

def test_cgroup_v2_limits_are_written_where_v2_wants_them(tmp_path: Path) -> None:
    """The v2 backend against a fake hierarchy: memory.max, memory.swap.max, cpu.max, io.max, the
    controllers enabled for the children, and the OOM count read from memory.events."""
    root = tmp_path / "cg"
    rank_dir = root / "sess" / "r0"
    rank_dir.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    for name in ("memory.swap.max", "cpu.max", "io.max"):  # files the kernel would provide
        (rank_dir / name).write_text("max\n")
    backend = cgroups.Backend(2, {"": root})
    dev = load_device("raspberry-pi-4", {"disk_read": "40MB"})
    notes = cgroups.create(backend, "sess", 0, dev, str(ROOT))
    assert (rank_dir / "memory.max").read_text() == str(4 * 2**30)
    assert (rank_dir / "memory.swap.max").read_text() == "0"
    assert (rank_dir / "cpu.max").read_text() == "100000 100000"
    assert (root / "sess" / "cgroup.subtree_control").read_text() in ("+memory", "+cpu", "+io")  # last write
    if cgroups._block_device(str(ROOT)) is None:
        assert any("disk read rate not applied" in n for n in notes)
    else:
        assert re.fullmatch(r"\d+:\d+ rbps=40000000", (rank_dir / "io.max").read_text())
    (rank_dir / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cgroups.oom_kills(backend, "sess", 0) == 1


# --- a cut link (root) ------------------------------------------------------------------------------------

class EmulatedRun:
    """`python -m tpi_mpi.emulate run` of a long generation on 3 devices; the streamed text is collected
    with the time each byte came, so that a test can act once the ranks are in the decode loop."""

    def __init__(self, session: str, model: Path, shards: Path, tmp: Path, tokens: int, timeout_s: float):
        self.record = tmp / "r.json"
        self.proc = subprocess.Popen(
            [*EMULATE, "run", f"session={session}", "network=wifi", "device=paper", "devices=3", "timeout=600", "--",
             f"hydra.run.dir={tmp}/hydra", f"model.path={model}", f"model.shards={shards}", "prompt_ids=[1,40,41]",
             f"generation.max_new_tokens={tokens}", "generation.stop_on_eos=false", "comm.algo=star",
             f"comm.timeout_s={timeout_s:g}", f"output.json={self.record}", "output.results=null"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.arrivals: list[float] = []  # time of each streamed byte
        self.streaming = threading.Event()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.stderr.append(self.proc.stderr.read()), daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while self.proc.stdout.read(1):
            self.arrivals.append(time.monotonic())
            if len(self.arrivals) >= 20:  # rank 0 streams generated text: every rank is in the decode loop
                self.streaming.set()

    def ranks(self, session: str) -> list[psutil.Process]:
        """The processes inside the session's rank namespaces (the ranks themselves)."""
        pids = [int(p) for k in range(3)
                for p in subprocess.run(["ip", "netns", "pids", netns.rank_ns(session, k)], capture_output=True,
                                        text=True).stdout.split()]
        assert pids, "no process in the rank namespaces"
        return [psutil.Process(p) for p in pids]

    def wait(self, timeout: float) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the emulated run was still going {timeout:g} s later")
        deadline = time.monotonic() + 10
        while not self.stderr and time.monotonic() < deadline:  # the reader thread sees EOF at exit
            time.sleep(0.01)
        return self.stderr[0].decode() if self.stderr else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `run` stops mpirun and tears the session down
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_tree(self.proc)
                self.proc.wait()


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cut")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=5, overrides={"max_position_embeddings": 4096})
    return model, split(model, root / "shards", 3)


@needs_shaping
def test_cut_link_is_named_by_the_watchdog_and_ends_the_job(session: str, tiny3: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    """Rank 2's link cut for good mid-generation (`emulate cut`): rank 0's watchdog names the operation and
    rank 2, every rank is gone within seconds, and `emulate down` finds nothing left."""
    timeout_s = 3
    job = EmulatedRun(session, *tiny3, tmp_path, 4000, timeout_s)  # minutes: it never ends by itself here
    try:
        assert job.streaming.wait(300), "no generated text within 300 s"
        ranks = job.ranks(session)
        p = emulate(["cut", f"session={session}", "rank=2"])
        cut_at = time.monotonic()
        assert p.returncode == 0 and p.stdout.strip() == f"session {session}: rank 2's link cut", p.stderr
        gone: dict[int, float] = {}
        _, alive = psutil.wait_procs(ranks, timeout=60, callback=lambda q: gone.setdefault(q.pid, time.monotonic()))
        assert not alive, f"ranks still running 60 s after the cut: {alive}"
        stderr = job.wait(30)
    finally:
        job.close()
    took = max(gone.values()) - cut_at
    print(f"cut -> every rank gone: {took:.1f} s (comm.timeout_s={timeout_s})")
    assert job.proc.returncode != 0
    errors = [line for line in stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert re.search(r"watchdog: [\w ]+ #\d+( of layer \d+ \(\w+\))? did not complete within "
                     rf"comm.timeout_s={timeout_s} s; rank 2 did not arrive", errors[0]), errors[0]
    assert "Traceback" not in stderr
    assert timeout_s <= took < timeout_s + 10, f"{took:.1f} s from the cut until every rank was gone"
    p = emulate(["down", f"session={session}"])
    assert p.returncode == 0 and p.stdout.strip() == f"session {session}: down, nothing left", p.stdout + p.stderr


@needs_shaping
def test_short_outage_generation_completes_with_the_same_tokens(session: str, tiny3: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    """Rank 2's link down for a few seconds (less than comm.timeout_s) mid-generation, then back: TCP
    retransmits, the generation stalls for the outage and completes with the tokens of a run without it."""
    model, shards = tiny3
    outage, timeout_s, tokens = 3.0, 20, 200
    job = EmulatedRun(session, model, shards, tmp_path / "cut", tokens, timeout_s)
    try:
        assert job.streaming.wait(300), "no generated text within 300 s"
        netns.set_link(session, 2, up=False)
        cut_at = time.monotonic()
        time.sleep(outage)  # the outage itself, not a synchronisation
        netns.set_link(session, 2, up=True)
        mended_at = time.monotonic()
        stderr = job.wait(300)
    finally:
        job.close()
    assert job.proc.returncode == 0, stderr[-3000:]
    record = json.loads(job.record.read_text())
    assert record["generated_tokens"] == tokens
    # The cut cut: no text streamed while the link was down (but for a token already on its way), and the
    # generation went on after it came back.
    assert not [t for t in job.arrivals if cut_at + 0.5 < t < mended_at], "text streamed while the link was down"
    before = max(t for t in job.arrivals if t <= cut_at + 0.5)
    after = min(t for t in job.arrivals if t >= mended_at)
    print(f"outage {outage:g} s (comm.timeout_s={timeout_s}): no text for {after - before:.2f} s, text again "
          f"{after - mended_at:.2f} s after the link came back")
    # The same tokens as a run without the outage (star allreduce: sums in rank order, the same bits).
    ref = mpirun(3, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp_path}/hydra", f"model.path={model}",
                     f"model.shards={shards}", "prompt_ids=[1,40,41]", f"generation.max_new_tokens={tokens}",
                     "generation.stop_on_eos=false", "comm.algo=star", "threads=1",
                     f"output.json={tmp_path}/ref.json", "output.results=null"], timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert record["token_ids"] == json.loads((tmp_path / "ref.json").read_text())["token_ids"]
