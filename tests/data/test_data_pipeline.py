"""Tokenised batches (DESIGN.md "Batches"), shift-right, deterministic shuffles, resume,
evaluation padding and host sharding. Tokenisation is checked against the HF tokenizer's own
truncation/padding on real RTE rows."""

import itertools

import numpy as np
import pytest

from compacter_jax.data import (
    DataState,
    decode_predictions,
    encode,
    eval_batches,
    get_task,
    pad_batch,
    shard_for_host,
    steps_per_epoch,
    train_batches,
)
from compacter_jax.models import shift_right

KEYS = {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}
S, T = 64, 4


@pytest.fixture(scope="module")
def rte_rows(files_source):
    return files_source.load("rte", "validation")[:24]


@pytest.fixture(scope="module")
def encoded(rte_rows, tokenizer):
    return encode("rte", rte_rows, tokenizer, max_source_length=S, max_target_length=T, train=True)


def test_encode_matches_hf_truncation_and_padding(rte_rows, tokenizer, encoded):
    task = get_task("rte")
    sources, targets = zip(*(task.format(ex) for ex in rte_rows))
    ref = tokenizer(list(sources), max_length=S, truncation=True, padding="max_length")
    np.testing.assert_array_equal(encoded.input_ids, np.array(ref["input_ids"]))
    np.testing.assert_array_equal(encoded.attention_mask, np.array(ref["attention_mask"]))
    ref_t = tokenizer(list(targets), max_length=T, truncation=True, padding="max_length")
    np.testing.assert_array_equal(encoded.labels, np.array(ref_t["input_ids"]))
    np.testing.assert_array_equal(encoded.decoder_attention_mask, np.array(ref_t["attention_mask"]))
    full_lengths = [len(ids) for ids in tokenizer(list(sources))["input_ids"]]
    assert encoded.num_truncated_source == sum(n > S for n in full_lengths) > 0
    assert encoded.num_truncated_target == 0
    assert (encoded.input_ids[:, -1][encoded.attention_mask[:, -1] == 1] == 1).all()  # EOS kept
    assert encoded.references == tuple(ex["label"] for ex in rte_rows)
    assert all(a.dtype == np.int32 for a in (encoded.input_ids, encoded.labels))


def test_shift_right():
    labels = np.array([[209, 1, 0, 0], [632, 3, 1, 0]], dtype=np.int32)
    np.testing.assert_array_equal(shift_right(labels), [[0, 209, 1, 0], [0, 632, 3, 1]])


def test_train_batches_shapes_and_shuffle(encoded):
    batch, state = next(train_batches(encoded, 5, seed=0))
    assert set(batch) == KEYS and state == DataState(0, 1)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        **{k: ((5, S), np.int32) for k in ("input_ids", "attention_mask")},
        **{k: ((5, T), np.int32) for k in ("labels", "decoder_input_ids",
                                           "decoder_attention_mask")}}
    np.testing.assert_array_equal(batch["decoder_input_ids"], shift_right(batch["labels"]))
    np.testing.assert_array_equal(batch["decoder_attention_mask"], batch["labels"] != 0)

    row_of = {encoded.input_ids[i].tobytes(): i for i in range(len(encoded))}
    assert len(row_of) == len(encoded)  # sources are distinct, so rows are identifiable

    def epoch_rows(seed, epoch):
        it = train_batches(encoded, 5, seed=seed, state=DataState(epoch, 0), num_epochs=epoch + 1)
        return [row_of[r.tobytes()] for b, _ in it for r in b["input_ids"]]

    assert steps_per_epoch(len(encoded), 5) == 5 and steps_per_epoch(25, 5) == 5
    e0, e1 = epoch_rows(0, 0), epoch_rows(0, 1)
    assert len(e0) == len(set(e0)) == 24  # 4 full batches + the partial one, no repeats
    assert e0 == epoch_rows(0, 0) and e0 != e1 and e0 != epoch_rows(1, 0)
    assert e0 != sorted(e0)
    last = list(train_batches(encoded, 5, seed=0, num_epochs=1))[-1]
    assert last[0]["input_ids"].shape == (4, S) and last[1] == DataState(1, 0)


def test_pad_batch_adds_empty_rows(encoded):
    batch = next(eval_batches(encoded, 3))
    batch = {k: batch[k] for k in KEYS}
    padded = pad_batch(batch, 5)
    for k in KEYS:
        assert padded[k].shape[0] == 5
        np.testing.assert_array_equal(padded[k][:3], batch[k])
        assert not padded[k][3:].any()       # no tokens, no loss
    assert pad_batch(batch, 3).keys() == batch.keys()
    with pytest.raises(ValueError, match="more than batch_size=2"):
        pad_batch(batch, 2)


def test_resume_from_any_position(encoded):
    full = list(train_batches(encoded, 5, seed=3, num_epochs=3))
    assert len(full) == 15 and full[4][1] == DataState(1, 0) and full[-1][1] == DataState(3, 0)
    for k in (1, 3, 4, 5, 9, 14):
        saved = DataState.from_dict(full[k - 1][1].to_dict())
        resumed = list(train_batches(encoded, 5, seed=3, state=saved, num_epochs=3))
        assert len(resumed) == 15 - k
        for (a, sa), (b, sb) in zip(resumed, full[k:]):
            assert sa == sb and all(np.array_equal(a[key], b[key]) for key in KEYS)
    # an index at the end of an epoch rolls over to the next one
    rolled = next(train_batches(encoded, 5, seed=3, state=DataState(0, 5)))
    assert np.array_equal(rolled[0]["input_ids"], full[5][0]["input_ids"])
    endless = train_batches(encoded, 5, seed=3)
    assert len(list(itertools.islice(endless, 30))) == 30
    with pytest.raises(ValueError, match="batch_size 25 must be in 1..24"):
        next(train_batches(encoded, 25, seed=0))


def test_eval_batches_cover_every_example_once(encoded):
    batches = list(eval_batches(encoded, 7))
    assert len(batches) == 4 and all(b["input_ids"].shape == (7, S) for b in batches)
    index = np.concatenate([b["example_index"] for b in batches])
    mask = np.concatenate([b["example_mask"] for b in batches])
    assert index[mask == 1].tolist() == list(range(24)) and mask.sum() == 24
    assert (index[mask == 0] == -1).all() and mask[-4:].tolist() == [0, 0, 0, 0]
    last = batches[-1]
    for key in KEYS:  # padding repeats the final real row, so no all-masked rows
        assert (last[key][3:] == last[key][2]).all()
    np.testing.assert_array_equal(batches[1]["input_ids"], encoded.input_ids[7:14])


def test_shard_for_host(encoded):
    batch = next(eval_batches(encoded, 8))
    shards = [shard_for_host(batch, i, 4) for i in range(4)]
    for key in batch:
        assert all(s[key].shape[0] == 2 for s in shards)
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), batch[key])
    with pytest.raises(ValueError, match="not divisible by 3 hosts"):
        shard_for_host(batch, 0, 3)
    with pytest.raises(ValueError, match="process_index 4"):
        shard_for_host(batch, 4, 4)


def test_record_expands_answers_only_for_training(tokenizer):
    rows = [{"passage": "Cats and dogs.", "query": "@placeholder bark.", "entities": ["Cats", "dogs"],
             "answers": ["dogs", "Dogs"], "idx": {"passage": 0, "query": 0}},
            {"passage": "Sun.", "query": "@placeholder shines.", "entities": ["Sun"],
             "answers": ["Sun"], "idx": {"passage": 1, "query": 1}}]
    train = encode("record", rows, tokenizer, max_source_length=32, max_target_length=8, train=True)
    test = encode("record", rows, tokenizer, max_source_length=32, max_target_length=8)
    assert len(train) == 3 and len(test) == 2
    assert decode_predictions(tokenizer, train.labels) == ["dogs", "Dogs", "Sun"]
    assert test.references == (("dogs", "Dogs"), ("Sun",))
    with pytest.raises(ValueError, match="no examples"):
        encode("record", [], tokenizer, max_source_length=32, max_target_length=8)


def test_trim_source_cuts_only_padding_columns():
    """Source columns cut to the longest source rounded up to the multiple (capped at S); the
    kept columns and every other column are the batch's own."""
    from compacter_jax.data import trim_source

    mask = np.zeros((3, 20), np.int32)
    mask[0, :5], mask[1, :11] = 1, 1                      # longest source: 11 tokens
    batch = {"input_ids": np.arange(60, dtype=np.int32).reshape(3, 20) * mask,
             "attention_mask": mask, "labels": np.ones((3, 4), np.int32)}
    for multiple, width in [(8, 16), (4, 12), (11, 11), (1, 11), (32, 20)]:
        out = trim_source(batch, multiple)
        assert out["input_ids"].shape == out["attention_mask"].shape == (3, width)
        np.testing.assert_array_equal(out["input_ids"], batch["input_ids"][:, :width])
        np.testing.assert_array_equal(out["attention_mask"], mask[:, :width])
        assert out["labels"] is batch["labels"]
        assert out["attention_mask"].sum() == mask.sum()  # no token dropped
    empty = trim_source({**batch, "attention_mask": np.zeros_like(mask)}, 8)
    assert empty["attention_mask"].shape == (3, 8)        # a batch of empty rows keeps a width
    with pytest.raises(ValueError, match="multiple_of must be positive"):
        trim_source(batch, 0)
