"""The terminal chat (`mpirun -n 2 python -m tpi_mpi.chat`) driven through a pseudo-terminal, as a person would.

Two turns (the second finds the first in the prompt cache), /reset (the same first message then gets the
same reply), Ctrl-D: every rank exits 0 and nothing is left running.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pexpect
import psutil
import pytest
from conftest import MPIRUN, ROOT, kill_tree
from serve_util import MODEL_NAME, chat_model

N = 2
TIMEOUT = 180  # s for start-up, and for each reply under a loaded machine
NOTE = re.compile(r"\[(\d+) tokens, (\d+)/(\d+) prompt tokens cached")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return chat_model(tmp_path_factory.mktemp("chat"), N)


def _reply(child: pexpect.spawn, line: str) -> tuple[str, int, int]:
    """Send a line; (the reply's text, cached prompt tokens, prompt tokens)."""
    child.sendline(line)
    child.expect(NOTE)
    text = child.before.split(line, 1)[-1].strip()  # the terminal echoes the line first
    cached, prompt = int(child.match.group(2)), int(child.match.group(3))
    child.expect_exact("> ")
    return text, cached, prompt


def test_two_turns_reset_and_ctrl_d(model: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    child = pexpect.spawn(MPIRUN, ["-n", str(N), sys.executable, "-m", "tpi_mpi.chat", f"hydra.run.dir={tmp_path}/h",
                                   f"model.path={model['model']}", f"model.shards={model['shards']}", "threads=1",
                                   "generation.max_new_tokens=8"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=TIMEOUT)
    try:
        procs = [psutil.Process(child.pid)]
        child.expect(f"tpi_mpi chat: {MODEL_NAME} on 2 ranks")
        procs += psutil.Process(child.pid).children(recursive=True)
        child.expect_exact("> ")
        first, cached1, prompt1 = _reply(child, "Good morrow")
        second, cached2, prompt2 = _reply(child, "Say more")
        assert cached1 == 0 and prompt2 > prompt1
        assert cached2 >= prompt1  # the first turn's prompt came from the cache
        child.sendline("/reset")
        child.expect_exact("(new conversation)")
        child.expect_exact("> ")
        again, _, prompt3 = _reply(child, "Good morrow")
        assert prompt3 == prompt1 and again == first  # the history is gone
        child.sendeof()  # Ctrl-D
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert "tpi_mpi: error" not in (child.before or "")
        left = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, left
    finally:
        if child.isalive():
            kill_tree(child)  # type: ignore[arg-type]  # mpirun and the ranks below it (it has a pid)
