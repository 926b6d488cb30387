"""Helpers of the serving tests: a chat model, and a real `mpirun ... python -m tpi_mpi.serve` on a free port."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from conftest import kill_tree, start_mpirun

from tpi_mpi.make_model import make_model
from tpi_mpi.weights.split import split

# The chat template of the trained demo model's tokenizer (speaker headings as in the plays).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[{{ message['content'] | trim }}]\n\n"
    "{% elif message['role'] == 'user' %}User.\n{{ message['content'] | trim }}\n\n"
    "{% else %}Assistant.\n{{ message['content'] | trim }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant.\n{% endif %}"
)
START_TIMEOUT = 180  # s until the server says where it listens (start-up under a loaded machine)
STOP_TIMEOUT = 60  # s from SIGTERM to every process gone


def chat_model(root: Path, ranks: int) -> dict[str, Path]:
    """A tiny Llama with a tokenizer that has a chat template, and its split for `ranks`."""
    from transformers import AutoTokenizer

    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=5)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model)
    return {"model": model, "shards": split(model, root / f"shards{ranks}", ranks)}


class Server:
    """`mpirun -n N python -m tpi_mpi.serve` on 127.0.0.1 and a free port (serve.port=0, read from its line)."""

    def __init__(self, n: int, model: dict[str, Path], tmp: Path, overrides: list[str],
                 env: dict[str, str] | None = None):
        self.proc = start_mpirun(n, [
            "-m", "tpi_mpi.serve", f"hydra.run.dir={tmp}/hydra", f"model.path={model['model']}",
            f"model.shards={model['shards']}", "serve.host=127.0.0.1", "serve.port=0", "threads=1", *overrides],
            env=env, stdout=subprocess.DEVNULL)
        self.lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            m = re.search(r"serving .* on (http://127\.0\.0\.1:\d+/v1) ", line)
            if m:
                return m.group(1)
        self.kill()
        raise AssertionError("the server did not start:\n" + "".join(self.lines)[-4000:])

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")

    def stderr(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        """mpirun's exit code; a server still running past `timeout` is killed and fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not exit within {timeout} s:\n{self.stderr()[-4000:]}") from None

    def stop(self) -> int:
        """SIGTERM as Ctrl-C or scancel would send it; every rank must exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc)
        self.proc.wait(timeout=30)
