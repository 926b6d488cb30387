"""Helpers of the serving tests: a chat model, and a real `mpirun ... python -m tpi_mpi.serve` on a free port."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from conftest import ROOT, kill_tree, run_tpi, start_mpirun

from tpi_mpi.weights.split import split

# The trained Shakespeare model committed with the repository (docs/trained_model.md): read, never written; its
# tokenizer has the chat template of checkpoints/shakespeare/chat_template.jinja (speaker headings as in the plays).
SHAKESPEARE = ROOT / "checkpoints" / "shakespeare"
MODEL_NAME = SHAKESPEARE.name  # the model id the API shows when serve.model_name is not set
CONTEXT = json.loads((SHAKESPEARE / "config.json").read_text())["max_position_embeddings"]  # the server's context
START_TIMEOUT = 180  # s until the server says where it listens (start-up under a loaded machine)
STOP_TIMEOUT = 60  # s from SIGTERM to every process gone
# The trained model was never shown an end-of-sequence token (docs/trained_model.md), but the streams that must
# run long (a client leaving mid-stream, a full queue, a rank killed mid-stream) are not left to depend on that;
# tpi_mpi.run, the reference, is told the same.
NO_EOS = "generation.stop_on_eos=false"


def chat_model(root: Path, ranks: int) -> dict[str, Path]:
    """The trained model (checkpoints/shakespeare, left as it is) and its split for `ranks` under `root`."""
    return {"model": SHAKESPEARE, "shards": split(SHAKESPEARE, root / f"shards{ranks}", ranks)}


def run_record(model: dict[str, Path], tmp: Path, ranks: int, prompt: list[str], new: int) -> dict[str, Any]:
    """tpi_mpi.run on the same split, greedy, `new` tokens: its record (text, token ids)."""
    out = tmp / "run.json"
    res = run_tpi(ranks, [f"model.path={model['model']}", f"model.shards={model['shards']}", *prompt,
                          f"generation.max_new_tokens={new}", "logging.quiet=true", f"output.json={out}",
                          "output.results=null", "threads=1", NO_EOS], tmp)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(out.read_text()))


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
