"""A T5-style SentencePiece vocabulary trained on text (experiments.train_tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest

from compacter_jax.data.span_corruption import NUM_SENTINELS, first_sentinel_id
from compacter_jax.tokenizer import load_tokenizer
from experiments.train_tokenizer import parse_text_sources, train_sentencepiece

def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    """Sentences of made-up words (random letters; load_tokenizer refuses vocabularies under
    1,000 entries, so the text must hold enough distinct strings), plus the words the test
    tokenises."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 8))) for _ in range(3000)]
    return ["the good film ."] * 20 + [
        " ".join(rng.choice(words, rng.integers(5, 20))) + " ." for _ in range(n)]


def test_trained_vocabulary_follows_t5_conventions(tmp_path):
    path = train_sentencepiece(corpus(), tmp_path / "tok", vocab_size=1000)
    assert path == tmp_path / "tok" / "spiece.model" and path.stat().st_size > 0
    assert not [p for p in path.parent.iterdir() if p.name != "spiece.model"]  # no temp file
    tok = load_tokenizer(path.parent)
    assert len(tok) == 1000 + NUM_SENTINELS
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "</s>", "<unk>"]
    # Sentinels count down from the last id, as in T5's 32,100-entry vocabulary.
    assert tok.convert_tokens_to_ids("<extra_id_0>") == 1000 + NUM_SENTINELS - 1
    assert tok.convert_tokens_to_ids("<extra_id_99>") == 1000
    assert first_sentinel_id(tok) == 1099  # what span corruption then uses
    ids = tok("the good film .").input_ids
    assert ids[-1] == 1 and 2 not in ids and max(ids) < 1000  # EOS appended, no BOS, no unk
    assert tok.decode(ids, skip_special_tokens=True) == "the good film ."


def test_parse_text_sources():
    assert parse_text_sources("") == ()
    assert "movie_reviews" in parse_text_sources("all")
    assert parse_text_sources(" brown, abc ") == ("brown", "abc")


def test_a_failed_write_keeps_the_old_model(tmp_path, monkeypatch):
    (tmp_path / "spiece.model").write_bytes(b"old")

    def disk_fails(*_):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("os.fsync", disk_fails)
    with pytest.raises(OSError, match="injected"):
        train_sentencepiece(corpus(200), tmp_path, vocab_size=100)
    assert [p.name for p in tmp_path.iterdir()] == ["spiece.model"]
    assert (tmp_path / "spiece.model").read_bytes() == b"old"
