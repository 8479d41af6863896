"""`cj.make_batch`: the step's batch from texts, padded or packed (issue 20)."""

import numpy as np
import pytest

import compacter_jax as cj
from compacter_jax.data import unpack_batch
from compacter_jax.train.step import BATCH_KEYS, PACKING_KEYS, check_batch

SOURCES = ["rte sentence1: A man plays a guitar. sentence2: A person makes music.",
           "rte sentence1: It rains. sentence2: The street is dry.",
           "sst2 sentence: great film"]
TARGETS = ["0", "1", "1"]


def test_padded_batch_is_the_tokenizers_ids(tokenizer):
    batch = cj.make_batch(tokenizer, SOURCES, TARGETS, batch_size=4)
    check_batch(batch)
    assert set(batch) == set(BATCH_KEYS)
    assert all(v.dtype == np.int32 and v.shape[0] == 4 for v in batch.values())
    for i, (src, tgt) in enumerate(zip(SOURCES, TARGETS)):
        src_ids, tgt_ids = tokenizer(src).input_ids, tokenizer(tgt).input_ids  # EOS appended
        assert src_ids[-1] == tokenizer.eos_token_id
        np.testing.assert_array_equal(batch["input_ids"][i, :len(src_ids)], src_ids)
        assert batch["attention_mask"][i].sum() == len(src_ids)
        np.testing.assert_array_equal(batch["labels"][i, :len(tgt_ids)], tgt_ids)
        # teacher forcing: start id 0, then the labels shifted right
        np.testing.assert_array_equal(batch["decoder_input_ids"][i, :len(tgt_ids)],
                                      [0] + tgt_ids[:-1])
    assert batch["input_ids"].shape[1] == max(len(tokenizer(s).input_ids) for s in SOURCES)
    assert not batch["attention_mask"][3].any() and not batch["labels"][3].any()  # empty row
    with pytest.warns(UserWarning, match="3 of 3 sources are longer than max_source_length=8"):
        cut = cj.make_batch(tokenizer, SOURCES, TARGETS, max_source_length=8)
    assert cut["input_ids"].shape == (3, 8) and cut["input_ids"][0, -1] == tokenizer.eos_token_id


def test_packed_batch_holds_the_same_examples(tokenizer):
    padded = cj.make_batch(tokenizer, SOURCES, TARGETS)
    packed = cj.make_batch(tokenizer, SOURCES, TARGETS, pack=True, max_source_length=64,
                           packed_target_length=8)
    check_batch(packed)
    assert set(packed) == set(BATCH_KEYS) | set(PACKING_KEYS)
    assert packed["input_ids"].shape == (1, 64)   # all three share one row
    np.testing.assert_array_equal(packed["encoder_segment_ids"][0][:3], [1, 1, 1])
    got = sorted((tuple(s), tuple(t)) for s, t in unpack_batch(packed))
    want = sorted((tuple(padded["input_ids"][i][padded["attention_mask"][i] > 0]),
                   tuple(padded["labels"][i][padded["decoder_attention_mask"][i] > 0]))
                  for i in range(3))
    assert got == want
    assert cj.make_batch(tokenizer, SOURCES, TARGETS, pack=True, row_multiple=4
                         )["input_ids"].shape[0] == 4


def test_bad_texts_are_refused(tokenizer):
    with pytest.raises(ValueError, match="as many targets as sources.*2 sources and 1 targets"):
        cj.make_batch(tokenizer, SOURCES[:2], TARGETS[:1])
    with pytest.raises(ValueError, match="one string; wrap it"):
        cj.make_batch(tokenizer, SOURCES[0], TARGETS[0])
    with pytest.raises(ValueError, match=r"targets\[1\] is int"):
        cj.make_batch(tokenizer, SOURCES[:2], ["0", 1])
    with pytest.raises(ValueError, match="need 3 rows: batch_size=1 is too small"):
        cj.make_batch(tokenizer, SOURCES, TARGETS, pack=True, batch_size=1,
                      packed_target_length=3)   # one 3-token target per row
