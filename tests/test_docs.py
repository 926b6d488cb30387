"""The documentation a newcomer follows: every relative link of README.md, CONTRIBUTING.md, docs/ and the
folders' READMEs leads to a file that exists (and to a heading that exists, for #anchors), and every
`python -m MODULE` shown (in a fenced code block or an inline code span) names a module that exists and whose
`--help` exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest
from conftest import ROOT, kill_tree

DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md"),
               *(p for d in ("experiments", "paper_figs", "slurm", "docker") for p in (ROOT / d).glob("*.md"))])
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`[^`]*`")
MODULE = re.compile(r"\bpython3? -m ((?:tpi_mpi|experiments|paper_figs)(?:\.\w+)*)")
MAKE = re.compile(r"(?:^|[;&|]\s*|^\s*)make ([a-z][\w-]*)")
HELP_TIMEOUT = 120  # s for one `--help`: torch is imported by most; 2 shared cores under load


def _split(path: Path) -> tuple[list[str], list[str]]:
    """(prose lines, fenced code lines) of a markdown file."""
    prose, code, inside = [], [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            inside = not inside
        elif inside:
            code.append(line)
        else:
            prose.append(line)
    return prose, code


@cache
def anchors(path: Path) -> frozenset[str]:
    """GitHub's heading ids: lower case, punctuation dropped (but - and _), spaces to -, -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in _split(path)[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(out)


def _links(path: Path) -> list[str]:
    # on the whole text: a link's words or a code span may run over a line break
    return [m.group(1) for m in LINK.finditer(CODE_SPAN.sub("", "\n".join(_split(path)[0])))]


def _commands(path: Path) -> list[str]:
    """Lines of fenced code blocks and inline code spans: where the docs show a command."""
    prose, code = _split(path)
    return code + [span.replace("\n", " ") for span in CODE_SPAN.findall("\n".join(prose))]


def _modules() -> list[str]:
    return sorted({m.group(1) for p in DOCS for line in _commands(p) for m in MODULE.finditer(line)})


def test_the_docs_exist_and_link_every_page():
    assert (ROOT / "README.md").is_file() and (ROOT / "CONTRIBUTING.md").is_file()
    readme_targets = {(ROOT / t.split("#")[0]).resolve() for t in _links(ROOT / "README.md")}
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 10, pages
    unlinked = [p.name for p in pages if p.resolve() not in readme_targets]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300, "README.md is the front page: ≤ 300 lines"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc: Path):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: -- not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_make_targets_shown_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {(p.name, m.group(1)) for p in DOCS for line in _commands(p) for m in MAKE.finditer(line)}
    assert shown, "no `make` command found in the docs: the pattern is broken"
    missing = sorted(f"{doc}: make {t}" for doc, t in shown if t not in targets)
    assert not missing, missing


def _help(module: str) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=HELP_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        return -1, f"--help did not exit within {HELP_TIMEOUT} s"
    return proc.returncode, out


@pytest.fixture(scope="module")
def helps() -> dict[str, tuple[int, str]]:
    """`--help` of every module the docs show, a few at once (each is mostly importing torch)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(_modules(), pool.map(_help, _modules()), strict=True))


def test_docs_show_modules():
    # the pattern finds the commands the README is built around; an empty list would pass everything below
    assert {"tpi_mpi.run", "tpi_mpi.split", "tpi_mpi.make_model"} <= set(_modules()), _modules()


@pytest.mark.parametrize("module", _modules())
def test_module_shown_has_help(module: str, helps: dict[str, tuple[int, str]]):
    code, out = helps[module]
    assert code == 0, f"python -m {module} --help exited {code}:\n{out[-2000:]}"
    assert out.strip(), f"python -m {module} --help printed nothing"
