"""The state file of an emulation session: everything `up` created, so that `down` can remove it, also
after a crashed `up` or a killed run. Written before anything is created and updated as things are,
atomically (temporary file, then rename).

The names themselves are derived from the session name (`<session>-hub`, `<session>-r3`, cgroup
directories `<session>`), so `down` also finds what a state file no longer lists.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tpi_mpi.errors import UserError
from tpi_mpi.results import write_json_atomic

STATE_DIR_ENV = "TPI_MPI_EMU_STATE_DIR"
DEFAULT_STATE_DIR = "/run/tpi_mpi-emulate"
SESSION_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, DEFAULT_STATE_DIR))


def check_session(session: str) -> str:
    # Short, because interface and namespace names derive from it (IFNAMSIZ is 16).
    if not SESSION_RE.match(session):
        raise UserError(f"session={session!r}: use 1-10 lower-case letters and digits, starting with a letter")
    return session


def state_path(session: str) -> Path:
    return state_dir() / f"{session}.json"


def load(session: str) -> dict[str, Any] | None:
    path = state_path(session)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def save(session: str, state: dict[str, Any]) -> None:
    write_json_atomic(state_path(session), state)  # a crash mid-write leaves the old state, never half


def remove(session: str) -> None:
    state_path(session).unlink(missing_ok=True)


# A session made by `run` or `check` lives only as long as the process that made it, which tears it down
# itself, unless it was killed with SIGKILL (or the machine's OOM killer took it). Such a session records its
# owner, so that the next `up` of the same name can tell a leftover from a session in use and remove it.
# The process's start time goes with the pid, because pids are reused.
def process_identity(pid: int) -> dict[str, Any] | None:
    """{"pid", "start"} of a live process (start: its start time in clock ticks since boot), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")"
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has ended; it waits only to be reaped
        return None
    return {"pid": pid, "start": fields[19]}


def owner_is_gone(st: dict[str, Any]) -> bool:
    """True if the session was made for one process (`owner`) and that process no longer runs."""
    owner = st.get("owner")
    return owner is not None and process_identity(int(owner["pid"])) != owner
