"""The memory scheduler: the same tokens as fully resident (and as HF) for several windows and a partly
resident plan, never more than the window's blocks in memory, budgets planned as documented."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SCRIPTS, mpirun, run_tpi
from safetensors.torch import load_file, save_file
from test_run_cli import hf_greedy

from tpi_mpi.config import MemoryConfig, build_config, parse_bytes
from tpi_mpi.errors import UserError
from tpi_mpi.make_model import make_model
from tpi_mpi.weights import tensorfile
from tpi_mpi.weights.cgroup_memory import cgroup_memory_limit, cgroup_memory_peak, cgroup_memory_usage
from tpi_mpi.weights.memplan import (
    HEAD_CHUNK_BYTES,
    READ_CHUNK_BYTES,
    _spread,
    plan_memory,
    plan_rank_memory,
)
from tpi_mpi.weights.prefetch import LayerPrefetcher
from tpi_mpi.weights.shards import open_rank_shard
from tpi_mpi.weights.split import split

MB = 2**20


# --- the prefetcher on its own ---------------------------------------------------------------------------

@pytest.fixture
def blocks(tmp_path: Path) -> dict[tuple[int, str], Path]:
    files = {}
    for layer in range(4):
        for kind, n in (("attn", 3), ("ffn", 7)):
            path = tmp_path / f"{layer}.{kind}.safetensors"
            save_file({"w": torch.randn(n, 16) + layer, "b": torch.full((n,), float(layer))}, str(path))
            files[(layer, kind)] = path
    return files


@pytest.mark.parametrize("window", [1, 2, 3])
def test_prefetcher_streams_blocks_in_order_within_the_window(blocks: dict, window: int) -> None:
    files = {k: tensorfile.parse_header(p) for k, p in blocks.items()}
    streamed = [k for k in sorted(files) if k != (1, "ffn")]  # (1, "ffn") kept resident
    pf = LayerPrefetcher(files, streamed, window, None)
    try:
        for _ in range(3):  # three forward passes: the stream goes round
            for key in sorted(files):
                with pf.block(*key) as w:
                    ref = load_file(str(blocks[key]))
                    assert torch.equal(w["w"], ref["w"]) and torch.equal(w["b"], ref["b"])
                    assert 1 <= pf.held <= window or key == (1, "ffn")
        assert 1 <= pf.stats.max_blocks_held <= window
        per_pass = sum(files[k].data_bytes for k in streamed)
        resident = files[(1, "ffn")].data_bytes
        # every pass re-reads every streamed block; the reader is never more than the window ahead
        assert resident + 3 * per_pass <= pf.stats.bytes_read <= resident + 3 * per_pass + window * per_pass
    finally:
        pf.close()


@pytest.mark.parametrize("window", [1, 3, 8])
def test_prefetcher_wait_filled_returns_with_the_window_full(blocks: dict, window: int) -> None:
    files = {k: tensorfile.parse_header(p) for k, p in blocks.items()}
    pf = LayerPrefetcher(files, sorted(files), window, None)
    try:
        pf.wait_filled()
        assert pf.stats.blocks_read == window  # filled, and no further: no buffer is free
        for key in sorted(files):
            with pf.block(*key):
                pass
    finally:
        pf.close()


def test_prefetcher_raises_a_read_failure_in_the_compute_thread(blocks: dict) -> None:
    files = {k: tensorfile.parse_header(p) for k, p in blocks.items()}
    with open(blocks[(2, "attn")], "r+b") as f:  # cut short after its header was checked
        f.truncate(files[(2, "attn")].data_offset + 4)
    pf = LayerPrefetcher(files, sorted(files), 2, None)
    try:
        pf.wait_filled()  # returns: the failure is the compute thread's to raise
        with pytest.raises(OSError, match="unexpected end of file"):
            for key in sorted(files):
                with pf.block(*key):
                    pass
    finally:
        pf.close()


def test_prefetcher_refuses_out_of_order_requests(blocks: dict) -> None:
    files = {k: tensorfile.parse_header(p) for k, p in blocks.items()}
    pf = LayerPrefetcher(files, sorted(files), 2, None)
    try:
        with pytest.raises(RuntimeError, match="out of step"):
            with pf.block(1, "ffn"):
                pass
    finally:
        pf.close()


# --- planning ----------------------------------------------------------------------------------------------

LAYERS = 10
BLOCKS = {**{(i, "attn"): 10 * MB for i in range(LAYERS)}, **{(i, "ffn"): 40 * MB for i in range(LAYERS)}}
FIXED = {"overhead": 300 * MB, "kv_cache": 5 * MB, "activations": 2 * MB, "slack": 48 * MB}
HEAD = 64 * MB


def _auto(budget: int, window: int | None = None) -> MemoryConfig:
    return MemoryConfig(resident="auto", budget=budget, window=window)


def test_budget_below_one_block_names_the_smallest_budget_that_works() -> None:
    smallest = sum(FIXED.values()) + 40 * MB + READ_CHUNK_BYTES + min(HEAD, HEAD_CHUNK_BYTES)
    with pytest.raises(UserError, match=f"smallest workable budget is .*raise memory.budget to at least {smallest}$"):
        plan_memory(_auto(smallest - 1), BLOCKS, FIXED, HEAD)
    plan = plan_memory(_auto(smallest), BLOCKS, FIXED, HEAD)
    assert (plan.mode, plan.window, len(plan.streamed)) == ("stream", 1, 2 * LAYERS)
    assert plan.predicted_bytes <= smallest


def test_residency_grows_with_the_budget_largest_reads_first() -> None:
    total = sum(BLOCKS.values())
    previous, previous_ffn = total + HEAD, 0
    seen_modes = set()
    for budget in range(450 * MB, sum(FIXED.values()) + total + HEAD + 20 * MB, 20 * MB):
        plan = plan_memory(_auto(budget), BLOCKS, FIXED, HEAD)
        seen_modes.add(plan.mode)
        assert plan.predicted_bytes <= budget
        resident = [k for k in BLOCKS if k not in plan.streamed]
        # what a token reads from disk never grows with the budget (beyond the greedy fill's granularity)
        reads = sum(BLOCKS[k] for k in plan.streamed) + (0 if plan.head_resident else HEAD)
        assert reads <= previous + BLOCKS[(0, "attn")]
        previous = reads
        ffn_in = sum(1 for k in resident if k[1] == "ffn")
        assert ffn_in >= previous_ffn  # FFN blocks first: attention blocks only fill what is left over
        previous_ffn = ffn_in
        if ffn_in < LAYERS:
            assert sum(BLOCKS[k] for k in resident if k[1] == "attn") < BLOCKS[(0, "ffn")]
        if not plan.head_resident:  # lm_head, the largest read, first: blocks only fill what it leaves
            assert sum(BLOCKS[k] for k in resident) < HEAD - HEAD_CHUNK_BYTES
    assert seen_modes == {"stream", "partial", "resident"}
    assert plan_memory(_auto(sum(FIXED.values()) + total + HEAD), BLOCKS, FIXED, HEAD).mode == "resident"


def test_window_is_lowered_to_fit_and_resident_blocks_are_spread() -> None:
    plan = plan_memory(_auto(500 * MB, window=3), BLOCKS, FIXED, HEAD)
    assert plan.window == 2
    assert _spread(list(range(10)), 5) == [0, 2, 4, 6, 8] and _spread(list(range(10)), 0) == []
    stream = plan_memory(MemoryConfig(resident=False, window=3), BLOCKS, FIXED, HEAD)
    assert (stream.mode, stream.window, len(stream.streamed)) == ("stream", 3, 2 * LAYERS)
    assert plan_memory(MemoryConfig(), BLOCKS, FIXED, HEAD).mode == "resident"


@pytest.mark.parametrize("memory,message", [
    ({"resident": True, "window": 2}, "resident=true keeps every block"),
    ({"resident": False, "budget": "1GB"}, "use memory.resident=auto"),
    ({"resident": "auto"}, "needs memory.budget"),
    ({"resident": "maybe"}, "true, false or auto"),
    ({"resident": "auto", "budget": "lots"}, "is not a size"),
    ({"resident": False, "window": 0}, "positive integer"),
    ({"head": "workers"}, "memory.head must be split or master"),
])
def test_memory_config_validation(memory: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config({"model": {"path": "m"}, "comm": {}, "memory": memory, "generation": {}, "logging": {},
                      "output": {}, "prompt_ids": [1]})


def test_parse_bytes() -> None:
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("800MiB") == 800 * MB
    assert parse_bytes(1234) == 1234 and parse_bytes("2048") == 2048


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_files_are_found(tmp_path: Path, version: str) -> None:
    proc = tmp_path / "cgroup"
    if version == "v1":
        proc.write_text("5:cpu:/\n4:memory:/jobs/r0\n0::/\n")
        d = tmp_path / "memory" / "jobs" / "r0"
        d.mkdir(parents=True)
        (d / "memory.max_usage_in_bytes").write_text("123456\n")
        (d / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
        assert cgroup_memory_limit(str(proc), str(tmp_path)) is None
    else:
        proc.write_text("0::/jobs/r0\n")
        d = tmp_path / "jobs" / "r0"
        d.mkdir(parents=True)
        (d / "memory.peak").write_text("123456\n")
        (d / "memory.max").write_text("500000000\n")
        assert cgroup_memory_limit(str(proc), str(tmp_path)) == 500_000_000
        (d / "memory.current").write_text("300000000\n")
        (d / "memory.stat").write_text("anon 200000000\nfile 100000000\ninactive_file 60000000\n")
        assert cgroup_memory_usage(str(proc), str(tmp_path)) == 240_000_000  # the working set
    assert cgroup_memory_peak(str(proc), str(tmp_path)) == {"cgroup": "/jobs/r0", "peak_bytes": 123456}
    proc.write_text("0::/\n")
    assert cgroup_memory_peak(str(proc), str(tmp_path)) is None


# --- end to end under mpirun -------------------------------------------------------------------------------

PROMPT = [1, 37, 250, 11, 400, 99, 3, 77, 120, 301, 45, 8]
NEW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # blocks of 1-6 MB per rank at N=2: several per budget step, still seconds to run
    return make_model(tmp_path_factory.mktemp("mem") / "m", "tiny", "llama", layers=4, seed=5,
                      overrides={"hidden_size": 512, "intermediate_size": 3072})


def test_same_tokens_for_every_window_and_partial_residency(model: Path, tmp_path: Path) -> None:
    shards = split(model, tmp_path / "shards", 2)
    specs = ["resident", "stream:1", "stream:2", "stream:3", "partial:2:3", "stream:2@master"]
    out = tmp_path / "mem.npz"
    # small lm_head chunks so that the streamed head is read in several pieces
    proc = mpirun(2, [str(SCRIPTS / "mem_forward.py"), "--head-chunk=65536", str(shards), str(out), str(NEW),
                      ",".join(specs), *map(str, PROMPT)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(out)
    ref = hf_greedy(model, PROMPT, NEW)
    block_bytes = [sum(p.stat().st_size for p in (shards / f"rank_{r}").glob("layer_*")) for r in range(2)]
    for i, spec in enumerate(specs):
        assert got[f"tokens_{i}"].tolist() == ref, spec
        window, held = got[f"window_{i}"], got[f"max_held_{i}"]
        assert (held <= window).all(), spec  # never more streamed blocks in memory than the window
        if spec.startswith("stream"):
            assert (held >= 1).all() and (got[f"streamed_{i}"] == 8).all()
            # every forward pass (prefill + NEW-1) re-read the whole shard from disk
            assert all(got[f"bytes_read_{i}"][r] >= NEW * block_bytes[r] for r in range(2)), spec
    assert str(got["mode_0"]) == "resident" and str(got["mode_4"]) == "partial"
    assert (got["streamed_4"] == 8 - 3).all()
    # lm_head streamed: split by vocabulary each rank reads its rows every pass; on the master rank 0 reads all
    vocab, hidden = (json.loads((model / "config.json").read_text())[k] for k in ("vocab_size", "hidden_size"))
    rows = [json.loads((shards / f"rank_{r}" / "manifest.json").read_text())["vocab_range"] for r in range(2)]
    assert rows[0][0] == 0 and rows[0][1] == rows[1][0] and rows[1][1] == vocab
    split_reads, master_reads = got["head_bytes_read_2"].tolist(), got["head_bytes_read_5"].tolist()
    assert split_reads == [NEW * (v1 - v0) * hidden * 4 for v0, v1 in rows]  # one read of its rows per pass
    assert master_reads == [NEW * vocab * hidden * 4, 0]


def test_streaming_refuses_a_dtype_cast(model: Path, tmp_path: Path) -> None:
    shard = open_rank_shard(split(model, tmp_path / "shards", 1), 0, 1)
    with pytest.raises(UserError, match="streams weights as stored on disk .*float32.*model.dtype=auto"):
        plan_rank_memory(shard, MemoryConfig(resident=False, window=2), torch.float16, True)
    assert plan_rank_memory(shard, MemoryConfig(resident=False, window=2), None, True).window == 2


def test_run_with_a_budget_too_small_is_one_clear_line(model: Path, tmp_path: Path) -> None:
    shards = split(model, tmp_path / "shards", 2)
    proc = run_tpi(2, [f"model.shards={shards}", f"prompt_ids={PROMPT}", "memory=budget", "memory.budget=1MB",
                       f"output.json={tmp_path}/r.json", "output.results=null"], tmp_path, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "memory.budget=1MB (1 MiB) is too small: the smallest workable budget is" in errors[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "r.json").exists()


# --- in a memory cgroup --------------------------------------------------------------------------------------

CGROUP_ROOT = Path("/sys/fs/cgroup")
LIMIT = 480_000_000  # the interpreter, torch, MPI and Hydra alone are charged ~300 MB
SMALL_LIMIT = 270_000_000  # enough to start (a rank imports no transformers), too small to run


def _cgroup_parent_dir() -> Path | None:
    """Where this test may create memory cgroups: v1's memory hierarchy, or a v2 root with memory."""
    if os.geteuid() != 0:
        return None
    if (CGROUP_ROOT / "memory" / "cgroup.procs").is_file():
        return CGROUP_ROOT / "memory"
    controllers = CGROUP_ROOT / "cgroup.controllers"
    if controllers.is_file() and "memory" in controllers.read_text().split():
        return CGROUP_ROOT
    return None


@pytest.fixture
def memcg() -> Iterator[Path]:
    base = _cgroup_parent_dir()
    if base is None:
        pytest.skip("needs root and a writable memory cgroup (v1 memory hierarchy or v2 with memory)")
    parent = base / f"tpi_mem_test_{uuid.uuid4().hex[:8]}"
    parent.mkdir()
    try:
        if base == CGROUP_ROOT:  # v2: let the ranks' cgroups below have the memory controller
            (parent / "cgroup.subtree_control").write_text("+memory")
        yield parent
    finally:
        for child in [*parent.glob("rank_*"), parent]:
            _remove_cgroup(child)


def _remove_cgroup(path: Path, timeout: float = 10) -> None:
    """rmdir, retried while the kernel still counts a task that has just exited (EBUSY: seen once at load
    20); a cgroup still busy after timeout fails."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rank's shard of ~2.4 GB (38 layers of hidden 1024, FFN 4096, fp32): over 5x the limit."""
    root = tmp_path_factory.mktemp("memcg")
    model = make_model(root / "m", "tiny", "llama", layers=38, seed=1,
                       overrides={"hidden_size": 1024, "intermediate_size": 4096})
    shards = split(model, root / "shards", 1)
    shutil.rmtree(model)  # the split is all the run needs
    return shards


def _run_in_memcg(memcg: Path, shards: Path, tmp: Path, limit: int) -> subprocess.CompletedProcess:
    return mpirun(1, [str(SCRIPTS / "in_memcg.py"), str(memcg), str(limit), "-m", "tpi_mpi.run",
                      f"hydra.run.dir={tmp}/hydra", f"model.shards={shards}", "prompt_ids=[1,2,3,4]",
                      "generation.max_new_tokens=2", "generation.stop_on_eos=false", "memory=budget",
                      "memory.budget=cgroup", "memory.kv_cache_tokens=16", f"output.json={tmp}/r.json",
                      "output.results=null"], timeout=300)


def test_shard_five_times_the_cgroup_limit_runs_within_it(memcg: Path, big_shard: Path, tmp_path: Path) -> None:
    shard_bytes = sum(p.stat().st_size for p in (big_shard / "rank_0").iterdir())
    assert shard_bytes >= 5 * LIMIT
    proc = _run_in_memcg(memcg, big_shard, tmp_path, LIMIT)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a rank over its limit is killed (MPICH exits 9)
    (rank,) = json.loads((tmp_path / "r.json").read_text())["ranks"]
    assert rank["cgroup"].endswith(f"{memcg.name}/rank_0")
    assert 0 < rank["cgroup_peak_bytes"] <= LIMIT
    assert rank["memory"]["mode"] in ("stream", "partial") and rank["memory"]["max_blocks_held"] >= 1
    assert rank["bytes_read"] >= 2 * shard_bytes * 0.9  # the weights really came from disk, pass after pass


def test_cgroup_below_the_smallest_budget_is_one_clear_error(memcg: Path, big_shard: Path, tmp_path: Path) -> None:
    proc = _run_in_memcg(memcg, big_shard, tmp_path, SMALL_LIMIT)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tpi_mpi: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.search(r"memory.budget=cgroup \(\d+ MiB\) is too small: the smallest workable budget is", errors[0])
    smallest = int(errors[0].rsplit(" ", 1)[1])
    assert SMALL_LIMIT < smallest < LIMIT  # the limit of the run above was enough, as it said
    assert "Traceback" not in proc.stderr
