"""Shard files damaged after the split are named before use; an interrupted split leaves nothing that
looks complete, and running it again works."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, kill_tree, run_tpi

from tpi_mpi.errors import UserError
from tpi_mpi.make_model import make_model
from tpi_mpi.weights.shards import open_rank_shard
from tpi_mpi.weights.split import block_file, split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=7)
    return {"model": model, "shards": split(model, root / "shards", 2)}


@pytest.fixture
def copy(tiny: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the split that a test may damage."""
    return Path(shutil.copytree(tiny["shards"], tmp_path / "shards"))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_manifest_records_both_checksums(tiny: dict[str, Path]) -> None:
    manifest = json.loads((tiny["shards"] / "rank_1" / "manifest.json").read_text())
    for meta in manifest["files"].values():
        assert len(meta["xxh3_128"]) == 32 and len(meta["sha256"]) == 64


def test_truncated_file_is_named(copy: Path) -> None:
    f = copy / "rank_1" / block_file(1, "ffn")
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(UserError, match=f"{f} has .* bytes, the manifest says"):
        open_rank_shard(copy, 1, 2)


@pytest.mark.parametrize("mode,algo", [("xxh3", "xxh3_128"), ("sha256", "sha256")])
def test_altered_byte_is_caught_by_default_and_with_sha256(copy: Path, mode: str, algo: str) -> None:
    f = copy / "rank_0" / block_file(0, "attn")
    flip_byte(f, f.stat().st_size - 5)  # a weight, same size: only a checksum sees it
    with pytest.raises(UserError, match=f"{f} does not match its {algo} checksum"):
        open_rank_shard(copy, 0, 2, verify_checksums=mode)
    open_rank_shard(copy, 0, 2, verify_checksums="none")  # sizes only: this is what "none" gives up


def test_old_manifest_without_xxh3_falls_back_to_sha256(copy: Path) -> None:
    mpath = copy / "rank_1" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for meta in manifest["files"].values():
        del meta["xxh3_128"]
    mpath.write_text(json.dumps(manifest))
    open_rank_shard(copy, 1, 2)
    f = copy / "rank_1" / block_file(1, "attn")
    flip_byte(f, f.stat().st_size - 5)
    with pytest.raises(UserError, match="does not match its sha256 checksum"):
        open_rank_shard(copy, 1, 2)


def test_altered_shard_stops_the_run_with_one_line(tiny: dict[str, Path], copy: Path, tmp_path: Path) -> None:
    f = copy / "rank_1" / block_file(1, "ffn")
    flip_byte(f, f.stat().st_size - 5)
    proc = run_tpi(2, [f"model.path={tiny['model']}", f"model.shards={copy}", "prompt_ids=[1,2,3]",
                       "output.results=null"], tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"rank 1: {f} does not match its xxh3_128 checksum" in errors[0]
    assert "Traceback" not in proc.stderr


def test_killed_split_leaves_no_complete_looking_directory(tmp_path: Path) -> None:
    # Big enough that the split takes a while after its first progress line (12 layers of ~16 MiB).
    model = make_model(tmp_path / "m", "tiny", "llama", layers=12, seed=1,
                       overrides={"hidden_size": 512, "intermediate_size": 2048})
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "tpi_mpi.split", "--model", str(model), "--out", str(out), "--world-size", "2"]
    with subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()  # blocks until the first layer is written (or the split fails)
            assert line.startswith("  split layer 1/12"), line
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            kill_tree(proc)
    assert not out.exists()  # nothing under the name a run would look for
    (partial,) = tmp_path.glob(".s.partial-*")  # what the killed split left, under its temporary name
    assert not (partial / "rank_0" / "manifest.json").exists()
    split(model, out, 2)  # a rerun works, and clears what the killed one left
    assert not list(tmp_path.glob(".s.partial-*"))
    assert open_rank_shard(out, 1, 2).num_layers == 12
