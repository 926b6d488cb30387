"""The run record (JSON) and the results file (JSONL) survive a writer killed mid-way."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, die_with_parent

from tpi_mpi.results import append_jsonl, read_jsonl, write_json_atomic


@pytest.fixture
def writer():  # type: ignore[no-untyped-def]
    """Starts a writer (Python code with tpi_mpi.results imported) in a session of its own, so that the test's
    SIGKILL reaches it alone. It is killed after the test whatever happened, and dies with pytest if pytest
    is killed first (PR_SET_PDEATHSIG): it must never outlive the test."""
    procs: list[subprocess.Popen] = []

    def start(code: str) -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, "-c", f"from tpi_mpi.results import *\n{code}"], cwd=ROOT,
                                      stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent()))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


RECORDS = 100  # the appender's bound: 200 MB at most; the test kills it after the second record


def wait_for(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    """Poll a condition on the file system (what the writer has done so far) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writer never got there"
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the writer finished before it was killed"


def test_unterminated_line_is_not_a_record_and_is_cut_before_the_next(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"run": 1})
    append_jsonl(path, {"run": 2})
    with open(path, "ab") as f:
        f.write(b'{"run": 3, "tok')  # what a writer killed inside write() can leave
    assert read_jsonl(path) == [{"run": 1}, {"run": 2}]
    append_jsonl(path, {"run": 4})
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and [json.loads(line) for line in lines[:-1]] == [{"run": 1}, {"run": 2}, {"run": 4}]


def test_jsonl_appender_killed_mid_way_leaves_whole_records(tmp_path: Path, writer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"run": "earlier"})
    size0 = path.stat().st_size
    # Records of ~2 MB each, as fast as it can: the kill lands between or inside writes. Bounded in bytes
    # (RECORDS x 2 MB) and in time, should neither the test's kill nor pytest's death reach it.
    proc = writer(f"import time\nend = time.monotonic() + 60\nfor i in range({RECORDS}):\n"
                  f"    append_jsonl({str(path)!r}, {{'i': i, 'pad': 'x' * 2_000_000}})\n"
                  "    if time.monotonic() > end:\n        break")
    wait_for(lambda: path.stat().st_size > size0 + 3_000_000)  # more than one record in
    kill(proc)
    records = read_jsonl(path)
    assert records[0] == {"run": "earlier"} and [r["i"] for r in records[1:]] == list(range(len(records) - 1))
    append_jsonl(path, {"run": "next"})
    lines = path.read_text().split("\n")
    assert lines[-1] == "" and [json.loads(line) for line in lines[:-1]][-1] == {"run": "next"}


def test_json_writer_killed_mid_way_leaves_the_old_record(tmp_path: Path, writer) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.json"
    write_json_atomic(path, {"run": "earlier"})
    proc = writer(f"write_json_atomic({str(path)!r}, {{'tokens': list(range(20_000_000))}})")
    wait_for(lambda: any(p.stat().st_size > 0 for p in tmp_path.glob(".r.json.*")))  # half written
    kill(proc)
    assert json.loads(path.read_text()) == {"run": "earlier"}
    write_json_atomic(path, {"run": "next"})
    assert json.loads(path.read_text()) == {"run": "next"}
