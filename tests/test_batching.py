"""Batched decoding (tpi_mpi/batching.py, Master.forward_batch): sequences of different lengths decoded
together get the tokens they get alone, whoever joins or leaves the batch; and the memory plan's slots.

Tolerance: a sequence's attention runs on its own KV cache slot exactly as alone, but its rows go through
every linear layer stacked with the other sequences' ([B, hidden] x W instead of [1, hidden] x W: a GEMM
instead of a GEMV), whose dot products sum in another order. In fp32 that moves logits of magnitude ~1 by a
few 1e-7 (measured: at most 6.6e-7 over three layers); LOGIT_ATOL allows 15x that, far below the gaps
between the top logits that decide the greedy tokens, which must be identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import SCRIPTS, mpirun

from tpi_mpi.config import MemoryConfig
from tpi_mpi.errors import UserError
from tpi_mpi.make_model import make_model
from tpi_mpi.weights.memplan import HEAD_CHUNK_BYTES, plan_rank_memory
from tpi_mpi.weights.shards import open_rank_shard
from tpi_mpi.weights.split import split
from tpi_mpi.weights.tensorfile import READ_CHUNK_BYTES

LOGIT_ATOL = 1e-5
SHAPE = {"hidden_size": 192, "num_attention_heads": 6, "num_key_value_heads": 3}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("batch") / "m", "tiny", "llama", layers=3, seed=3, overrides=SHAPE)


def _check(s: dict, name: str) -> None:
    assert s["tokens"] == s["solo"], f"{name}: batched tokens {s['tokens']} != solo {s['solo']}"
    assert s["max_abs_diff"] <= LOGIT_ATOL, f"{name}: logits differ by {s['max_abs_diff']:.3g} from the solo run"
    assert s["logit_scale"] > 0.1  # the logits compared are not all near zero


@pytest.mark.parametrize("n,ratios,max_batch,chunk,algo,stream", [
    (2, None, 3, 8, "star", False),
    (3, [0.5, 0.3, 0.2], 4, 5, "auto", True),
], ids=["n2-resident-b3-star", "n3-uneven-stream-b4-auto"])
def test_batched_equals_solo(model: Path, tmp_path: Path, n: int, ratios: list[float] | None, max_batch: int,
                             chunk: int, algo: str, stream: bool) -> None:
    shards = split(model, tmp_path / "s", n, ratios)
    out = tmp_path / "out.json"
    r = mpirun(n, [str(SCRIPTS / "batch_decode.py"), str(shards), str(out), str(max_batch), str(chunk), algo,
                   *(["stream"] if stream else [])], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())

    # Six prompts of 1..19 tokens, all submitted at once into max_batch slots: the rest wait for a slot.
    for i, s in enumerate(res["together"]):
        _check(s, f"together[{i}]")
        assert len(s["tokens"]) == 10 and s["finish_reason"] == "length"
    occupancy = {int(k): v for k, v in res["together_stats"]["occupancy"].items()}
    assert max(occupancy) == max_batch  # passes did carry a full batch
    assert sum(res["together_slot_uses"]) == 6 and max(res["together_slot_uses"]) >= 2  # slots reused
    # A 19-token prompt over chunks of `chunk`: prefill tokens are the prompts' total, each run once.
    assert res["together_stats"]["prefill_tokens"] == 4 + 19 + 1 + 7 + 11 + 6
    if stream:
        # Every pass reads each streamed block once for the whole batch (plus what the window read ahead).
        passes, blocks = res["together_stats"]["passes"], res["streamed_blocks"]
        assert blocks > 0 and abs(res["together_blocks_read"] - passes * blocks) <= res["window"]

    # Joining and leaving mid-batch: those that ran to the end and the cancelled one (as far as it got) have
    # their solo tokens; the short one finished after 3; the refused prompt touched nobody.
    mid = res["mid"]
    for k, s in mid.items():
        _check(s, f"mid[{k}]")
    assert mid["1"]["finish_reason"] == "cancelled" and 0 < len(mid["1"]["tokens"]) < 10
    assert mid["3"]["finish_reason"] == "length" and len(mid["3"]["tokens"]) == 3
    assert all(len(mid[k]["tokens"]) == 10 for k in ("0", "2", "4", "5"))
    assert res["mid_refused"] and "outside the vocabulary" in res["mid_refused"]
    assert max(res["mid_slot_uses"]) >= 2  # a freed slot (cancelled or finished) taken by a later sequence

    # Prompt cache per slot: the follow-up prompt found its prefix in the slot of the sequence it extends.
    again, other = res["cache"]
    _check(again, "cache follow-up")
    _check(other, "cache other")
    assert again["slot"] == res["cache_first_slot"] and again["cached"] == 4 + 10 - 1
    assert other["cached"] == 0
    if algo == "auto":  # it chose per message size: B x hidden fp32 for batches of 1..max_batch at least
        assert {b * SHAPE["hidden_size"] * 4 for b in range(1, max_batch + 1)} <= set(res["auto_sizes"])


def test_memory_plan_refuses_max_batch(model: Path, tmp_path: Path) -> None:
    """A budget that holds the smallest plan and 3.5 sequences: max_batch=8 and 4 are refused in one line
    naming 3, and 3 is planned. Big KV slots (50k positions) keep the process's own RSS drift between the
    calls (it is the plan's overhead) far below half a slot."""
    shard = open_rank_shard(split(model, tmp_path / "s", 1), 0, 1)
    tokens = 50000

    def mem(budget: int | None) -> MemoryConfig:
        return MemoryConfig(resident="auto" if budget else True, budget=budget, kv_cache_tokens=tokens)

    one = plan_rank_memory(shard, mem(None), None, True, slots=1)
    two = plan_rank_memory(shard, mem(None), None, True, slots=2)
    kv_slot = one.parts["kv_cache"]
    assert kv_slot == 3 * 2 * 96 * tokens * 4  # layers x (k, v) x kv columns x positions x fp32
    per_slot = two.predicted_bytes - one.predicted_bytes  # its KV cache and the master's logits of one more
    assert two.parts["kv_cache"] == 2 * kv_slot and per_slot > kv_slot
    largest = max(tf.data_bytes for tf in shard.block_files().values())
    # The smallest plan without any sequence: fixed parts, one streamed block, a read chunk, a head chunk.
    rest = (one.parts["overhead"] + one.parts["activations"] - (per_slot - kv_slot) + one.parts["slack"] + largest
            + READ_CHUNK_BYTES + min(one.parts["head"], HEAD_CHUNK_BYTES))
    budget = int(rest + 3.5 * per_slot)
    for asked in (8, 4):
        with pytest.raises(UserError, match=re.escape(f"serve.max_batch={asked} does not fit")) as exc:
            plan_rank_memory(shard, mem(budget), None, True, slots=asked)
        assert str(exc.value).endswith("the largest that fits is serve.max_batch=3")
        assert "\n" not in str(exc.value)
    plan = plan_rank_memory(shard, mem(budget), None, True, slots=3)
    assert plan.parts["kv_cache"] == 3 * kv_slot and plan.predicted_bytes <= budget
    with pytest.raises(UserError, match="too small"):  # not even one sequence: the budget is the problem
        plan_rank_memory(shard, mem(int(rest + 0.5 * per_slot)), None, True, slots=2)
