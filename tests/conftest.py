"""Shared helpers: every mpirun a test starts has a timeout, and a hang is a failure; no test leaves a
process behind (see `no_process_left`)."""

from __future__ import annotations

import ctypes
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
MPIRUN = str(Path(sys.executable).with_name("mpirun"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL mpirun and every process below it. Not just its process group: hydra starts each rank
    in a session of its own (setsid), so killing mpirun's group would leave the ranks running."""
    try:
        top = psutil.Process(proc.pid)
        procs = [*top.children(recursive=True), top]  # collected first: once mpirun dies they are orphans
    except psutil.NoSuchProcess:
        return
    # tpi_mpi's sentinel exits by itself once the ranks are gone, removing its marker directory.
    sentinels = [p for p in procs if _is_sentinel(p)]
    for p in procs:
        if p not in sentinels:
            _kill(p)
    psutil.wait_procs([p for p in procs[:-1] if p not in sentinels], timeout=10)
    for p in psutil.wait_procs(sentinels, timeout=5)[1]:
        _kill(p)


def _is_sentinel(p: psutil.Process) -> bool:
    try:
        return "tpi_mpi.comm.sentinel" in p.cmdline()
    except psutil.Error:
        return False


def _kill(p: psutil.Process) -> None:
    try:
        p.kill()
    except psutil.NoSuchProcess:
        pass


def start_mpirun(n: int, args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
                 stdout: int | None = subprocess.PIPE) -> subprocess.Popen:
    """Start `mpirun -n N python ARGS` in a session of its own (the caller must wait with a timeout).
    mpirun dies with the thread that calls this (die_with_parent): call it from the test's own thread."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([MPIRUN, "-n", str(n), sys.executable, *args], cwd=cwd or ROOT, env=full_env,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=die_with_parent())


def communicate_or_fail(proc: subprocess.Popen, timeout: float, what: str) -> tuple[str, str]:
    """Wait for `proc` with a timeout; past it, or on any interruption, it and everything below it are killed,
    and a timeout fails the test naming `what` with the end of its stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"{what} hung for {timeout}s:\n{(err or '')[-3000:]}")
    finally:
        if proc.poll() is None:  # interrupted otherwise (Ctrl-C in pytest): leave nothing running
            kill_tree(proc)
    return out, err


def mpirun(n: int, args: list[str], timeout: float = 180, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `mpirun -n N python ARGS`; a run past its timeout fails the test, and it and every rank are killed."""
    with start_mpirun(n, args, cwd, env) as proc:
        out, err = communicate_or_fail(proc, timeout, f"mpirun -n {n} {' '.join(args)}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_tpi(n: int, overrides: list[str], tmp: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return mpirun(n, ["-m", "tpi_mpi.run", f"hydra.run.dir={tmp}/hydra", *overrides], timeout=timeout)


# ---- No test leaves a process behind -----------------------------------------------------------------------
# Each test runs with TPI_MPI_TEST_ID=<pytest pid>:<test number> in the environment, which every process it
# starts inherits (mpirun passes it to the ranks, they to the sentinel, sbatch to the job), whatever session
# or process group it puts itself in and whoever its parent is by then. After the test, any live process
# that carries the test's id, or is a new descendant of pytest, fails the test and is killed.
TEST_ID = "TPI_MPI_TEST_ID"
LEAK_GRACE_S = 5.0  # a process on its way out (the sentinel exits once the ranks are gone) may finish
_tests = itertools.count()
os.environ[TEST_ID] = f"{os.getpid()}:setup"  # what module and session fixtures' processes carry
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> object:
    """A preexec_fn: the child gets SIGKILL when the thread that started it dies, pytest SIGKILLed included
    (no fixture runs then). Killing mpirun this way takes its ranks with it (hydra's proxies see it go)."""
    parent = os.getpid()

    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: nobody would kill us later
            os._exit(1)

    return preexec


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:  # gone, or a kernel thread
        return False


def processes_of(test_id: str) -> list[psutil.Process]:
    """Live processes (not zombies) on this machine that carry TPI_MPI_TEST_ID=test_id."""
    entry = f"{TEST_ID}={test_id}".encode()
    found = []
    for pid in psutil.pids():
        if pid != os.getpid() and _environ_has(pid, entry):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.Error:
                pass
    return found


def _new_descendants(before: set[int]) -> list[psutil.Process]:
    """Live descendants of pytest that did not exist before the test and do not descend from one that did
    (the daemons of a module fixture start processes of their own)."""
    me = os.getpid()
    new = []
    for p in psutil.Process(me).children(recursive=True):
        try:
            if p.pid in before or p.status() == psutil.STATUS_ZOMBIE:
                continue
            if not any(a.pid in before for a in p.parents() if a.pid != me):
                new.append(p)
        except psutil.Error:
            pass
    return new


def kill_and_wait(procs: list[psutil.Process], timeout: float = 10) -> None:
    for p in procs:
        _kill(p)
    psutil.wait_procs(procs, timeout=timeout)


@pytest.fixture(autouse=True)
def no_process_left(request: pytest.FixtureRequest) -> Iterator[str]:
    """Fails a test that leaves a process running, and kills what it left, so that the next test starts clean.
    Runs first and is torn down last (autouse), after the test's own fixtures have stopped their processes;
    also when pytest is interrupted (Ctrl-C, SIGTERM: pytest tears fixtures down on KeyboardInterrupt)."""
    test_id = f"{os.getpid()}:{next(_tests)}"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    os.environ[TEST_ID] = test_id
    try:
        yield test_id
    finally:
        os.environ[TEST_ID] = f"{os.getpid()}:setup"
        left = {p.pid: p for p in [*processes_of(test_id), *_new_descendants(before)]}
        _, alive = psutil.wait_procs(list(left.values()), timeout=LEAK_GRACE_S) if left else ([], [])
        alive = [p for p in alive if _alive(p)]
        if alive:
            described = [_describe(p) for p in alive]
            kill_and_wait(alive)
            pytest.fail(f"{request.node.nodeid} left {len(alive)} process(es) running (killed now): {described}")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} sid {os.getsid(p.pid)}: {' '.join(p.cmdline())[:200]}"
    except (psutil.Error, OSError):
        return f"pid {p.pid}"


def _leftovers_of_dead_runs() -> list[psutil.Process]:
    """Processes a pytest run that was SIGKILLed (no fixture ran) left: they carry a dead pytest's pid."""
    found = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        for e in entries:
            if e.startswith(f"{TEST_ID}=".encode()):
                owner = int(e.split(b"=", 1)[1].split(b":")[0])
                if not psutil.pid_exists(owner):
                    try:
                        found.append(psutil.Process(pid))
                    except psutil.Error:
                        pass
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    # SIGTERM (a CI runner's timeout, `kill`) tears fixtures down as Ctrl-C does, instead of leaving
    # every process a test started running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    stale = _leftovers_of_dead_runs()
    if stale:
        print(f"\nkilling {len(stale)} process(es) left by an earlier pytest run that was killed: "
              f"{[_describe(p) for p in stale]}", file=sys.stderr)
        kill_and_wait(stale)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture is torn down: what module or session fixtures left (they run between tests)."""
    left = [p for p in processes_of(f"{os.getpid()}:setup") if _alive(p)]
    if left:
        print(f"\nsession fixtures left {len(left)} process(es) running (killed now): "
              f"{[_describe(p) for p in left]}", file=sys.stderr)
        kill_and_wait(left)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
