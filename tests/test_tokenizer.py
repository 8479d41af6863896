"""The real T5 SentencePiece tokenizer from local files."""

from __future__ import annotations

import pytest

from compacter_jax.tokenizer import load_tokenizer


def test_real_t5_ids(t5_vocab):
    tok = load_tokenizer(t5_vocab)
    assert len(tok) == 32100  # not transformers' 104-entry toy vocabulary
    ids = tok("translate English to German: The house is wonderful.").input_ids
    assert ids == [13959, 1566, 12, 2968, 10, 37, 629, 19, 1627, 5, 1]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == \
        "translate English to German: The house is wonderful."


def test_default_dir_is_shared_vocab(t5_vocab):
    assert load_tokenizer()("positive").input_ids == load_tokenizer(t5_vocab)("positive").input_ids


def test_missing_spiece_model_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(tmp_path)
    monkeypatch.setenv("COMPACTER_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="COMPACTER_DATA_DIR"):
        load_tokenizer()


def test_uncached_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local HF cache"):
        load_tokenizer("nobody/no-such-t5-tokenizer")


def test_the_shipped_backbone_carries_its_tokenizer_without_a_data_folder(tmp_path, monkeypatch):
    from compacter_jax.paths import checkpoints_dir
    from compacter_jax.tokenizer import tokenizer_for_model

    folder = checkpoints_dir() / "t5-mini-glue"
    monkeypatch.setenv("COMPACTER_DATA_DIR", str(tmp_path))  # no t5_vocab/ anywhere
    tok = tokenizer_for_model(folder, vocab_size=32128)
    assert load_tokenizer("t5-mini-glue")("a film").input_ids == tok("a film").input_ids
    assert tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.decode(tok("a delightful film").input_ids, skip_special_tokens=True) == \
        "a delightful film"
    with pytest.raises(FileNotFoundError, match="COMPACTER_DATA_DIR"):
        tokenizer_for_model(None)  # a random: preset has none of its own: the shared one


def test_a_tokenizer_larger_than_the_vocabulary_is_an_error(tmp_path):
    from compacter_jax.paths import checkpoints_dir
    from compacter_jax.tokenizer import tokenizer_for_model

    folder = checkpoints_dir() / "t5-mini-glue"
    size = len(load_tokenizer(folder))
    with pytest.raises(ValueError, match=rf"tokenizer {folder / 'spiece.model'} has "
                                         rf"{size:,} entries but the model's vocab_size is "
                                         r"1,000"):
        tokenizer_for_model(folder, vocab_size=1000)
