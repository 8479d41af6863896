"""Row-keyed dropout (`train/dropout.py`): row r of every `nn.Dropout` input gets the mask of
`fold_in(key, rows[r])`, so a device holding rows 4..7 draws what one device draws for them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_toy import make_batch

from compacter_jax.train.dropout import row_keyed_dropout
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import BATCH_KEYS, BatchKeyError, make_eval_step, make_train_step
from compacter_jax.peft import partition


def _drop(x, rows, rate=0.5, broadcast_dims=(), key=None):
    with row_keyed_dropout(jnp.asarray(rows, jnp.int32)):
        return nn.Dropout(rate, broadcast_dims=broadcast_dims).apply(
            {}, x, deterministic=False, rng=key)


def test_each_row_draws_its_own_key_and_shards_agree():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 5)) + 3.0, jnp.float32)
    key = jax.random.PRNGKey(3)
    full = np.asarray(_drop(x, np.arange(8), key=key))
    for r in range(8):  # the reference: flax's own rule (keep w.p. 1 - rate, scale 1/keep)
        keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, r), 0.5, (3, 5)))
        np.testing.assert_array_equal(full[r], np.where(keep, np.asarray(x[r]) / 0.5, 0.0))
    assert 0.3 < (full == 0).mean() < 0.7
    # The second "device" holds rows 4..7 and knows their global index: the same masks.
    np.testing.assert_array_equal(np.asarray(_drop(x[4:], np.arange(4, 8), key=key)), full[4:])
    # One key for all rows (what pmap used to do) would not be:
    assert not np.array_equal(np.asarray(_drop(x[4:], np.arange(4), key=key)), full[4:])
    # broadcast_dims share the mask along that axis, per row.
    shared = np.asarray(_drop(x, np.arange(8), broadcast_dims=(1,), key=key))
    assert np.all((shared == 0) == (shared[:, :1] == 0))
    # Deterministic / rate 0 pass the input through; a batch that is not on axis 0 is refused.
    with row_keyed_dropout(jnp.arange(8)):
        np.testing.assert_array_equal(nn.Dropout(0.5).apply({}, x, deterministic=True), x)
    with pytest.raises(ValueError, match=r"do not have the 4 batch rows on axis 0.*"
                                         r"per_example_dropout=True"):
        _drop(x, np.arange(4), key=key)


def test_a_batch_missing_a_key_names_it():
    # The check runs before the model: a stand-in apply_fn that must never be reached.
    def apply_fn(*args):
        raise AssertionError("the batch should have been refused before the model ran")

    tx = optax.sgd(1e-3)
    params = {"w": jnp.ones(2)}
    step = make_train_step(apply_fn, tx, merge_fn=partition.merge)
    state = TrainState.create(params, tx, 0)
    batch = make_batch(np.random.default_rng(0), 4)
    del batch["decoder_input_ids"]
    expected = ", ".join(BATCH_KEYS)
    with pytest.raises(BatchKeyError, match=rf"missing 'decoder_input_ids'.*{expected}.*"
                                            r"compacter_jax.make_batch"):
        step(state, {}, batch)
    evaluate = make_eval_step(apply_fn, merge_fn=partition.merge)
    with pytest.raises(KeyError, match="missing 'decoder_input_ids'"):
        evaluate(params, {}, batch)
    half_packed = dict(make_batch(np.random.default_rng(0), 4),
                       encoder_segment_ids=np.ones((4, 6), np.int32))
    with pytest.raises(BatchKeyError, match="missing 'encoder_positions', "
                                            "'decoder_segment_ids', 'decoder_positions'"):
        step(state, {}, half_packed)
