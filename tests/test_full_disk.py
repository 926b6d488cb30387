"""A full disk under TMPDIR, Hydra's output folder, output.results or output.json: the job ends with one line
naming the path, and the records already in the results file are intact.

Each test mounts a small tmpfs (root only) under its tmp_path and fills it; the fixture unmounts it whatever
happens and checks that it is gone. A mount left by a pytest that was killed is removed by the next run
(its source names the pytest's pid).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import MPIRUN, ROOT, communicate_or_fail, die_with_parent, start_mpirun

from tpi_mpi.make_model import make_model
from tpi_mpi.results import append_jsonl, read_jsonl, write_json_atomic
from tpi_mpi.weights.split import split

N = 2
SOURCE = "tpi_mpi_test_full_"  # + the pid of the pytest that mounted it


def _mounts() -> list[tuple[str, str]]:
    """(source, mount point) of every mount, as /proc/self/mounts escapes them."""
    rows = [line.split()[:2] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [(src, mnt.replace("\\040", " ")) for src, mnt in rows]


def _umount(mnt: str) -> None:
    if subprocess.run(["umount", mnt], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)  # busy: detach it now


class FullDisk:
    """A tmpfs of SIZE that the test fills when its earlier files are on it."""

    SIZE = 256 << 10

    def __init__(self, path: Path):
        self.path = path

    def fill(self, inodes: bool) -> None:
        """No data block left; with inodes, no inode either, so that mkdir fails too (a directory on a real
        disk needs a block; on tmpfs only an inode)."""
        with open(self.path / ".filler", "wb", buffering=0) as f:
            try:
                while f.write(b"\0" * 4096):
                    pass
            except OSError as exc:
                assert exc.errno == 28, exc
        if inodes:
            try:
                for i in range(10_000):
                    (self.path / f".inode{i}").touch()
            except OSError as exc:
                assert exc.errno == 28, exc
        assert os.statvfs(self.path).f_bavail == 0


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[FullDisk]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    for src, mnt in _mounts():  # left by a pytest that was SIGKILLed (no fixture ran)
        if src.startswith(SOURCE) and not psutil.pid_exists(int(src[len(SOURCE):])):
            _umount(mnt)
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FullDisk.SIZE},nr_inodes=256",
                    f"{SOURCE}{os.getpid()}", str(mnt)], check=True, capture_output=True, timeout=30)
    try:
        yield FullDisk(mnt)
    finally:
        _umount(str(mnt))
        assert str(mnt) not in [m for _, m in _mounts()], f"{mnt} is still mounted"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full_disk")
    model = make_model(root / "tiny", "tiny", "llama", layers=2, seed=5)
    return {"model": model, "shards": split(model, root / "shards", N)}


def run_job(tiny: dict[str, Path], tmp: Path, overrides: list[str], env: dict[str, str] | None = None
            ) -> tuple[int, str]:
    args = ["-m", "tpi_mpi.run", f"model.path={tiny['model']}", f"model.shards={tiny['shards']}",
            "prompt_ids=[1,40,41]", "generation.max_new_tokens=4", "threads=1", *overrides]
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        args.append(f"hydra.run.dir={tmp}/hydra")
    proc = start_mpirun(N, args, env=env)
    _, err = communicate_or_fail(proc, 180, "the job on a full disk")
    return proc.returncode, err


def the_error(code: int, err: str) -> str:
    """The one error line, which names a full disk (no traceback: it is not a bug)."""
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, err[-3000:]
    assert "No space left on device" in errors[0] and errors[0].endswith(": free space there or write elsewhere")
    assert "Traceback" not in err, err[-3000:]
    print(f"\n{errors[0]}")  # pytest -s: the lines docs/reliability.md shows
    return errors[0]


EARLIER = [{"run": 1, "text": "earlier"}, {"run": 2, "text": "records"}]
PAGE = 4096  # tmpfs allocates whole pages: what the file's last page has left still takes bytes


def test_appending_to_a_full_disk_keeps_the_earlier_records(full_disk: FullDisk) -> None:
    path = full_disk.path / "results.jsonl"
    for r in EARLIER:
        append_jsonl(path, r)
    before = path.read_bytes()
    full_disk.fill(inodes=False)
    # Longer than what is left of the file's last page: part of the line goes in (a short write), then the
    # same with that page full, where write() takes nothing (ENOSPC)
    append_jsonl(path, {"run": 3, "pad": "x" * (PAGE - len(before) - 200)})  # fits in the page: written
    before = path.read_bytes()
    assert read_jsonl(path)[:2] == EARLIER and len(before) < PAGE
    with open(path, "ab") as f:  # an unterminated line, as a writer killed mid-write leaves: cut first
        f.write(b'{"run": 4, "to')
    for size in (PAGE, 100_000):
        with pytest.raises(OSError, match=re.escape(str(path))) as exc:
            append_jsonl(path, {"run": 5, "pad": "x" * size})
        assert exc.value.errno == 28 and "the earlier records are intact" in str(exc.value)
        assert path.read_bytes() == before
    full = PAGE - len(before) - 1 - len(json.dumps({"run": 6, "pad": ""}))
    append_jsonl(path, {"run": 6, "pad": "x" * full})  # exactly to the end of the page
    before = path.read_bytes()
    assert len(before) == PAGE
    with pytest.raises(OSError, match=re.escape(str(path))):
        append_jsonl(path, {"run": 7})
    assert path.read_bytes() == before
    json_path = full_disk.path / "r.json"
    with pytest.raises(OSError, match=re.escape(str(json_path))):
        write_json_atomic(json_path, {"tokens": list(range(100_000))})
    assert not json_path.exists() and not list(full_disk.path.glob(".r.json.*"))


def test_full_tmpdir(tiny: dict[str, Path], tmp_path: Path, full_disk: FullDisk) -> None:
    full_disk.fill(inodes=True)  # rank 0's sentinel cannot make its directory there
    line = the_error(*run_job(tiny, tmp_path, ["output.results=null"], env={"TMPDIR": str(full_disk.path)}))
    assert line.startswith(f"tpi_mpi: error: rank 0: {full_disk.path}: No space left on device (making the "
                           "sentinel's directory in TMPDIR)"), line


def test_full_hydra_output_folder(tiny: dict[str, Path], tmp_path: Path, full_disk: FullDisk) -> None:
    full_disk.fill(inodes=False)  # Hydra can make its folders and open its files, not write into them
    hydra_dir = full_disk.path / "hydra"
    line = the_error(*run_job(tiny, tmp_path, [f"hydra.run.dir={hydra_dir}", "output.results=null"]))
    assert line.startswith(f"tpi_mpi: error: rank 0: {hydra_dir}/"), line  # the file Hydra was writing


def test_full_results_file_keeps_its_earlier_records(tiny: dict[str, Path], tmp_path: Path,
                                                     full_disk: FullDisk) -> None:
    results = full_disk.path / "results.jsonl"
    # Earlier records up to the end of the file's page (a run's record, ~3 KB, would fit in what was left)
    earlier = [EARLIER[0], {**EARLIER[1], "pad": ""}]
    earlier[1]["pad"] = "x" * (PAGE - len("".join(json.dumps(r) + "\n" for r in earlier)))
    for r in earlier:
        append_jsonl(results, r)
    assert results.stat().st_size == PAGE
    full_disk.fill(inodes=False)
    line = the_error(*run_job(tiny, tmp_path, [f"output.results={results}"]))
    assert line.startswith(f"tpi_mpi: error: rank 0: {results}: No space left on device (the record was not "
                           "appended; the earlier records are intact)"), line
    assert results.read_text() == "".join(json.dumps(r) + "\n" for r in earlier)


def test_full_json_record_keeps_the_earlier_one(tiny: dict[str, Path], tmp_path: Path, full_disk: FullDisk) -> None:
    record = full_disk.path / "r.json"
    write_json_atomic(record, {"run": 1})
    full_disk.fill(inodes=False)
    line = the_error(*run_job(tiny, tmp_path, [f"output.json={record}", "output.results=null"]))
    assert line.startswith(f"tpi_mpi: error: rank 0: {record}: No space left on device"), line
    assert json.loads(record.read_text()) == {"run": 1}
    assert not list(full_disk.path.glob(".r.json.*"))


def test_first_use_split_into_a_full_cache(tiny: dict[str, Path], tmp_path: Path, full_disk: FullDisk) -> None:
    full_disk.fill(inodes=False)  # rank 0 splits model.path into model.cache_dir; the workers wait
    line = the_error(*run_job(tiny, tmp_path, ["model.shards=null", f"model.cache_dir={full_disk.path}",
                                               "output.results=null"]))
    assert line.startswith(f"tpi_mpi: error: rank 0: {full_disk.path}/."), line  # a file of the partial split
    assert not [p for p in full_disk.path.iterdir() if not p.name.startswith(".filler")], "a partial split left"


@pytest.mark.parametrize("cli", ["split", "make_model"])
def test_command_line_tools_on_a_full_disk(tiny: dict[str, Path], full_disk: FullDisk, cli: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from tpi_mpi.make_model import main as make_model_main
    from tpi_mpi.split import main as split_main

    full_disk.fill(inodes=False)
    out = full_disk.path / "out"
    with pytest.raises(SystemExit) as exc:
        if cli == "split":
            split_main(["--model", str(tiny["model"]), "--out", str(out), "--world-size", "2"])
        else:
            make_model_main(["--out", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"tpi_mpi: error: {full_disk.path}/"), err
    assert err[0].endswith("No space left on device: free space there or write elsewhere"), err
    assert not [p for p in full_disk.path.iterdir() if p.name != ".filler"], "a partial output was left"


NO_TEMP_DIR = """
set -eu
data=$1 repo=$2; shift 2
mount --bind "$data" /srv  # the model and the Hydra folder, where the job sees them (an empty folder here)
mount --bind "$repo" /mnt  # the checkout (its .venv): put back below if it lies in a folder made full
for d in /tmp /var/tmp; do  # every folder Python's tempfile tries (the cwd is /tmp): full, blocks and inodes
  rel=""
  case "$repo/" in "$d"/*) rel=${repo#"$d"/} ;; esac
  # inodes: the root, and one directory per component of the checkout's path below $d (its mount point)
  mount -t tmpfs -o size=4k,nr_inodes=$((1 + $(printf %s "${rel:+$rel/}" | tr -cd / | wc -c))) tpi_mpi_test_full_ns "$d"
  if [ -n "$rel" ]; then mkdir -p "$d/$rel" && mount --bind /mnt "$d/$rel"; fi
  head -c 8192 /dev/zero > "$d/f" 2>/dev/null || true
done
cd /tmp
exec env -u TMPDIR "$@"
"""


def test_no_temporary_directory_anywhere(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The issue's case: the whole disk full, so rank 0's sentinel finds no temporary directory (the job
    hung for 10 minutes before). /tmp and /var/tmp are full only in a mount namespace of the job's own: the
    machine's are untouched, and the namespace goes with its last process."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare (util-linux) for a mount namespace")
    shutil.copytree(tiny["model"], tmp_path / "tiny")
    shutil.copytree(tiny["shards"], tmp_path / "shards")
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", NO_TEMP_DIR, "bash", str(tmp_path),
         str(ROOT), MPIRUN, "-n", str(N), sys.executable, "-m", "tpi_mpi.run", "hydra.run.dir=/srv/hydra",
         "model.path=/srv/tiny", "model.shards=/srv/shards", "prompt_ids=[1,40,41]", "output.results=null",
         "threads=1"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=die_with_parent())
    _, err = communicate_or_fail(proc, 120, "the job with no temporary directory")
    assert proc.returncode == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("tpi_mpi: error:")]
    assert errors == ["tpi_mpi: error: No usable temporary directory found in ['/tmp', '/var/tmp', '/usr/tmp', "
                      "'/tmp'] (full, read-only or missing): set TMPDIR to a folder with space"], err[-3000:]
    assert "tpi_mpi_test_full_ns" not in Path("/proc/self/mounts").read_text()
