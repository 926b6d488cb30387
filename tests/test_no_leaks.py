"""No test leaves a process behind: conftest's check after every test, and what happens when pytest itself is
interrupted or killed. Each case runs an inner pytest (with this conftest) on a small test file.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import TEST_ID, kill_and_wait

HERE = Path(__file__).resolve().parent
SLEEPER = f"[{sys.executable!r}, '-c', 'import time; time.sleep(300)']"


def processes_of_run(pytest_pid: int) -> list[psutil.Process]:
    """Every live process that a pytest with this pid (its tests and fixtures) started."""
    prefix = f"{TEST_ID}={pytest_pid}:".encode()
    found = []
    for pid in psutil.pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if any(e.startswith(prefix) for e in f.read().split(b"\0")):
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


class Inner:
    """An inner pytest on one test file, in a folder with a copy of this conftest."""

    def __init__(self, folder: Path, source: str):
        folder.mkdir(exist_ok=True)
        shutil.copy(HERE / "conftest.py", folder / "conftest.py")
        (folder / "test_inner.py").write_text(source)
        self.pidfile = folder / "pids"
        self.proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "--rootdir", str(folder), str(folder / "test_inner.py")],
                                     cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.seen: dict[int, psutil.Process] = {}

    def wait_for_pids(self, count: int, timeout: float = 60) -> list[int]:
        """The pids the inner test wrote (one per line), once it has written `count` of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pidfile.exists():
                pids = [int(x) for x in self.pidfile.read_text().split()]
                if len(pids) >= count:
                    self.note()
                    return pids
            assert self.proc.poll() is None, self.proc.communicate()[0]
            time.sleep(0.02)
        raise AssertionError("the inner test never started its processes")

    def note(self) -> None:
        """Remember what the inner run has started so far, to be sure to kill it at the end."""
        self.seen.update({p.pid: p for p in processes_of_run(self.proc.pid)})

    def finish(self, timeout: float = 120) -> str:
        try:
            return self.proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"the inner pytest did not end:\n{self.proc.communicate()[0]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        kill_and_wait([*self.seen.values(), *processes_of_run(self.proc.pid)])


@pytest.fixture
def inner(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    runs: list[Inner] = []

    def start(source: str, name: str = "inner") -> Inner:
        runs.append(Inner(tmp_path / name, source))
        return runs[-1]

    yield start
    for run in runs:
        run.close()


def gone(pids: list[int], timeout: float = 10) -> bool:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


LEAKY = f"""
import subprocess, sys
from pathlib import Path

def note(pid):
    with open(Path(__file__).parent / "pids", "a") as f:
        f.write(f"{{pid}}\\n")

def test_leaves_a_process_in_its_own_session():
    note(subprocess.Popen({SLEEPER}, start_new_session=True).pid)

def test_leaves_an_orphan():  # its parent exits at once: it is no descendant of pytest any more
    out = subprocess.run([sys.executable, "-c", "import subprocess; print(subprocess.Popen({SLEEPER}, "
                          "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
                         capture_output=True, text=True, check=True).stdout
    note(int(out))

def test_clean():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""


def test_a_test_that_leaves_a_process_fails_and_the_process_is_killed(inner) -> None:  # type: ignore[no-untyped-def]
    run = inner(LEAKY)
    out = run.finish()
    pids = [int(x) for x in run.pidfile.read_text().split()]
    assert len(pids) == 2 and gone(pids, timeout=1), out
    assert run.proc.returncode == 1, out
    for name in ("test_leaves_a_process_in_its_own_session", "test_leaves_an_orphan"):
        assert f"Failed: test_inner.py::{name} left 1 process(es) running (killed now)" in out, out
        assert f"ERROR test_inner.py::{name} - Failed" in out, out
    # the three tests' bodies passed; the two that left a process fail in the check after them, not the third
    assert "3 passed, 2 errors" in out and "test_clean - " not in out, out


WAITING = f"""
import subprocess, sys, time
from pathlib import Path

def test_starts_a_process_then_waits():
    p = subprocess.Popen({SLEEPER}, start_new_session=True)
    (Path(__file__).parent / "pids").write_text(f"{{p.pid}}\\n")
    time.sleep(300)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_pytest_kills_what_the_test_started(inner, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    run = inner(WAITING)
    [pid] = run.wait_for_pids(1)
    run.proc.send_signal(sig)
    out = run.finish(timeout=30)
    assert gone([pid], timeout=1), out
    assert "KeyboardInterrupt" in out and "left 1 process(es) running (killed now)" in out, out


KILLED = f"""
import subprocess, sys, time
from pathlib import Path
from conftest import die_with_parent, start_mpirun

def test_starts_mpirun_and_a_writer_then_waits():
    mpirun = start_mpirun(2, ["-c", "import time; from mpi4py import MPI; MPI.COMM_WORLD.Barrier(); "
                                    "print('up', flush=True); time.sleep(300)"])
    assert mpirun.stdout.readline().strip() == "up"  # the ranks are running
    writer = subprocess.Popen({SLEEPER}, start_new_session=True, preexec_fn=die_with_parent())
    (Path(__file__).parent / "pids").write_text(f"{{mpirun.pid}}\\n{{writer.pid}}\\n")
    time.sleep(300)
"""


def test_killed_pytest_takes_mpirun_its_ranks_and_the_writer_with_it(inner) -> None:  # type: ignore[no-untyped-def]
    run = inner(KILLED)
    run.wait_for_pids(2)
    started = list(run.seen.values())
    ranks = [p for p in started if p.name().startswith("python") and "mpi4py" in " ".join(p.cmdline())]
    assert len(ranks) == 2 and len(started) >= 4, started  # mpirun, its proxy, 2 ranks, the writer
    run.proc.kill()  # no fixture, no finally runs in pytest now
    assert gone([p.pid for p in started]), [p for p in started if p.is_running()]


def test_the_next_run_kills_what_a_killed_run_left(inner) -> None:  # type: ignore[no-untyped-def]
    run = inner(WAITING)
    [pid] = run.wait_for_pids(1)
    run.proc.kill()
    run.proc.wait(timeout=30)
    assert not gone([pid], timeout=1), "expected to outlive the killed pytest (no die_with_parent)"
    out = inner("def test_nothing():\n    pass\n", name="next").finish()
    assert gone([pid], timeout=1), out
    assert "killing 1 process(es) left by an earlier pytest run that was killed" in out, out
