"""2,000 generated tokens: no rank's peak memory grows after warm-up (the KV cache is reserved up front)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_tpi

from tpi_mpi.engine import WARMUP_PASSES
from tpi_mpi.make_model import make_model
from tpi_mpi.weights.split import split

TOKENS = 2000
# What may still grow after warm-up: the token list, the streamed text, allocator noise. A KV cache that
# grew with the sequence would add 2 layers x (K + V) x 4 KV heads x 2,000 x 32 x 4 B = 4 MiB per rank.
MARGIN_BYTES = 3 * 2**20


def test_peak_rss_does_not_grow_after_warmup(tmp_path: Path) -> None:
    model = make_model(tmp_path / "tiny", "tiny", "llama", layers=2, seed=2,
                       overrides={"max_position_embeddings": 4096})
    shards = split(model, tmp_path / "shards", 2)
    proc = run_tpi(2, [f"model.path={model}", f"model.shards={shards}", "prompt_ids=[1,40,41]",
                       f"generation.max_new_tokens={TOKENS}", "generation.stop_on_eos=false", "threads=1",
                       f"output.json={tmp_path}/r.json", "output.results=null"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "r.json").read_text())
    assert rec["generated_tokens"] == TOKENS
    for r in rec["ranks"]:
        assert r["forward_passes"] == TOKENS > WARMUP_PASSES
        # The peak (what the issue asks), what is resident at the end (it may be below an early peak), and
        # what malloc has handed out (sensitive to a leak that reuses memory freed after loading).
        for what in ("peak_rss", "rss", "heap"):
            warm, end = r[f"{what}_warm_bytes"], r[f"{what}_bytes"]
            print(f"rank {r['rank']}: {what} {warm / 2**20:.1f} MiB after {WARMUP_PASSES} passes, "
                  f"{end / 2**20:.1f} MiB after {TOKENS}: {(end - warm) / 2**10:+.0f} KiB")
            assert end - warm < MARGIN_BYTES, f"rank {r['rank']}: {what} grew {(end - warm) / 2**20:.1f} MiB"
