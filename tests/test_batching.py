"""Batched decoding (tpi_mpi/batching.py, Master.forward_batch): sequences of different lengths decoded
together get the tokens they get alone, whoever joins or leaves the batch, in float and in packed int8 / int4
weights; and the memory plan's slots. The model is the trained one (checkpoints/shakespeare, read only; its splits
go to tmp), on the starts of lines from the plays.

Tolerance, float (fp32) splits: a sequence's attention runs on its own KV cache slot exactly as alone, but its
rows go through every linear layer stacked with the other sequences' ([B, hidden] x W instead of [1, hidden] x
W: a GEMM instead of a GEMV), whose dot products sum in another order. In fp32 that moves the trained model's
logits (largest 9-13) by at most 1.4e-5 (measured over its four layers); LOGIT_ATOL allows 7x that, far below
the gaps between the top logits that decide the greedy tokens (the smallest here: 1.7e-3), which must be
identical.

Quantized splits: the batch and the solo run use the same packed weights and the same kernels, and a row's
activations are rounded to bf16 in the same way in both; but the kernels' output is bf16 too, and a kernel may
sum a [B, K] input in another order than a [1, K] one (int8 did here at N=2), so a value may round to the
neighbouring bf16 number (2^-8 relative; the logits themselves come out of lm_head's kernel in bf16: steps of
0.0625 between 8 and 16). Measured: int8 logits at most 0.0625 (one such step, 0.5 % of the largest logit) from
the solo run's, int4 identical bits. QUANT_TOL allows 1 % of the largest solo logit, two steps. bf16 logits tie
often (equal top two), so greedy tokens may differ only where the logits' measured difference could flip the
choice (the solo run's top-two margin at most twice it); the texts part there and are compared no further, which
must be rare.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPTS, mpirun

from tpi_mpi.config import MemoryConfig
from tpi_mpi.errors import UserError
from tpi_mpi.weights.memplan import HEAD_CHUNK_BYTES, plan_rank_memory
from tpi_mpi.weights.shards import open_rank_shard
from tpi_mpi.weights.split import split
from tpi_mpi.weights.tensorfile import READ_CHUNK_BYTES

MODEL = ROOT / "checkpoints" / "shakespeare"
CONFIG = json.loads((MODEL / "config.json").read_text())
LOGIT_ATOL = 1e-4
QUANT_TOL = 0.01  # of the largest solo logit: bf16 rounding in the packed kernels (module docstring)
# Six prompts of different lengths (<s> and the first tokens of a line), one longer than a prefill chunk.
LINES = ["KING HENRY. What news from France?",
         "Now is the winter of our discontent made glorious summer by this sun of York; and all the clouds that "
         "lour'd upon our house in the deep bosom of the ocean buried.",
         "",
         "HAMLET. To be, or not to be, that is the question",
         "ROMEO. But soft, what light through yonder window breaks? It is the east",
         "My lord, I have remembrances of yours"]
LENGTHS = [4, 19, 1, 7, 11, 6]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    ids = [list(tok(line).input_ids[:n]) for line, n in zip(LINES, LENGTHS, strict=True)]
    assert [len(i) for i in ids] == LENGTHS
    path = tmp_path_factory.mktemp("batch") / "prompts.json"
    path.write_text(json.dumps(ids))
    return path


def _check(s: dict, name: str, quant: str) -> int:
    """The batched sequence `s` against its solo run; the number of its tokens compared."""
    n = len(s["tokens"])
    assert s["logit_scale"] > 1.0  # the logits compared are not all near zero
    if quant == "none":
        assert s["tokens"] == s["solo"], f"{name}: batched tokens {s['tokens']} != solo {s['solo']}"
        worst = max(s["diffs"], default=0.0)
        assert worst <= LOGIT_ATOL, f"{name}: logits differ by {worst:.3g} from the solo run"
        return n
    tol = QUANT_TOL * s["logit_scale"]
    assert len(s["tokens"]) == len(s["solo"]) == len(s["diffs"]), name
    for i, (diff, margin) in enumerate(zip(s["diffs"], s["solo_margins"], strict=True)):
        assert diff <= tol, f"{name}: token {i}'s logits differ by {diff:.3g} (> {tol:.3g}) from the solo run"
        if s["tokens"][i] != s["solo"][i]:  # only a near tie that this difference can flip
            assert 0 < diff and margin <= 2 * diff, f"{name}: batched tokens {s['tokens']} != solo {s['solo']} at {i}"
            return i + 1
    return n

@pytest.mark.parametrize("n,ratios,max_batch,chunk,algo,stream,quant", [
    (2, None, 3, 8, "star", False, "none"),
    (3, [0.5, 0.3, 0.2], 4, 5, "auto", True, "none"),
    (2, None, 3, 8, "star", False, "int8"),
    (2, [0.7, 0.3], 4, 5, "star", True, "int4"),  # N=2 rather than 3 (half the time): 3 and 1 units of 2 KV heads
], ids=["n2-resident-b3-star", "n3-uneven-stream-b4-auto", "int8-n2-resident-b3", "int4-n2-uneven-stream-b4"])
def test_batched_equals_solo(prompts: Path, tmp_path: Path, n: int, ratios: list[float] | None, max_batch: int,
                             chunk: int, algo: str, stream: bool, quant: str) -> None:
    shards = split(MODEL, tmp_path / "s", n, ratios, quant_format=quant)
    out = tmp_path / "out.json"
    r = mpirun(n, [str(SCRIPTS / "batch_decode.py"), str(shards), str(out), str(prompts), str(max_batch),
                   str(chunk), algo, *(["stream"] if stream else [])], timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["weights"] == {"none": "fp32", "int8": "int8", "int4": "int4-g64"}[quant]
    compared, total = 0, 0

    def check(s: dict, name: str) -> None:
        nonlocal compared, total
        compared += _check(s, name, quant)
        total += len(s["tokens"])

    # Six prompts of 1..19 tokens, all submitted at once into max_batch slots: the rest wait for a slot.
    for i, s in enumerate(res["together"]):
        check(s, f"together[{i}]")
        assert len(s["tokens"]) == 10 and s["finish_reason"] == "length"
    occupancy = {int(k): v for k, v in res["together_stats"]["occupancy"].items()}
    assert max(occupancy) == max_batch  # passes did carry a full batch
    assert sum(res["together_slot_uses"]) == 6 and max(res["together_slot_uses"]) >= 2  # slots reused
    # A 19-token prompt over chunks of `chunk`: prefill tokens are the prompts' total, each run once.
    assert res["together_stats"]["prefill_tokens"] == sum(LENGTHS)
    if stream:
        # Every pass reads each streamed block once for the whole batch (plus what the window read ahead).
        passes, blocks = res["together_stats"]["passes"], res["streamed_blocks"]
        assert blocks > 0 and abs(res["together_blocks_read"] - passes * blocks) <= res["window"]

    # Joining and leaving mid-batch: those that ran to the end and the cancelled one (as far as it got) have
    # their solo tokens; the short one finished after 3; the refused prompt touched nobody.
    mid = res["mid"]
    for k, s in mid.items():
        check(s, f"mid[{k}]")
    assert mid["1"]["finish_reason"] == "cancelled" and 0 < len(mid["1"]["tokens"]) < 10
    assert mid["3"]["finish_reason"] == "length" and len(mid["3"]["tokens"]) == 3
    assert all(len(mid[k]["tokens"]) == 10 for k in ("0", "2", "4", "5"))
    assert res["mid_refused"] and "outside the vocabulary" in res["mid_refused"]
    assert max(res["mid_slot_uses"]) >= 2  # a freed slot (cancelled or finished) taken by a later sequence

    # Prompt cache per slot: the follow-up prompt found its prefix in the slot of the sequence it extends.
    again, other = res["cache"]
    check(again, "cache follow-up")
    check(other, "cache other")
    assert again["slot"] == res["cache_first_slot"] and again["cached"] == LENGTHS[0] + 10 - 1
    assert other["cached"] == 0
    if algo == "auto":  # it chose per message size: B x hidden fp32 for batches of 1..max_batch at least
        assert {b * CONFIG["hidden_size"] * 4 for b in range(1, max_batch + 1)} <= set(res["auto_sizes"])
    assert compared >= 0.75 * total, f"near ties cut the comparison to {compared} of {total} tokens"


def test_memory_plan_refuses_max_batch(tmp_path: Path) -> None:
    """A budget that holds the smallest plan and 3.5 sequences: max_batch=8 and 4 are refused in one line
    naming 3, and 3 is planned. Big KV slots (50k positions) keep the process's own RSS drift between the
    calls (it is the plan's overhead) far below half a slot."""
    shard = open_rank_shard(split(MODEL, tmp_path / "s", 1), 0, 1)
    tokens = 50000

    def mem(budget: int | None) -> MemoryConfig:
        return MemoryConfig(resident="auto" if budget else True, budget=budget, kv_cache_tokens=tokens)

    one = plan_rank_memory(shard, mem(None), None, True, slots=1)
    two = plan_rank_memory(shard, mem(None), None, True, slots=2)
    kv_slot = one.parts["kv_cache"]
    kv_columns = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    assert kv_slot == CONFIG["num_hidden_layers"] * 2 * kv_columns * tokens * 4  # layers x (k, v) x positions x fp32
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
