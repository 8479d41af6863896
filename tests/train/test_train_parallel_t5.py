"""One device, 4 devices under jit and 4 under pmap train a Compacter++ T5 identically, with
the default dropout (masks keyed by global row) and with per-example dropout (vmapped)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from compacter_jax import peft
from compacter_jax.train import (TrainState, make_optimizer, make_strategy, make_train_step,
                                 seq2seq_apply_fn)


def random_batches(num, batch=8, src=12, tgt=4, vocab=32128, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        ids = rng.integers(2, vocab, (batch, src)).astype(np.int32)
        mask = (np.arange(src)[None] < rng.integers(4, src + 1, (batch, 1))).astype(np.int32)
        labels = rng.integers(2, 100, (batch, tgt)).astype(np.int32)
        dec_in = np.concatenate([np.zeros((batch, 1), np.int32), labels[:, :-1]], axis=1)
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels,
                    "decoder_input_ids": dec_in,
                    "decoder_attention_mask": np.ones_like(labels)})
    return out


def run(strategy_name, num_devices, batches, per_example_dropout):
    method = peft.get_method("compacter++", reduction_factor=8)
    model, params = peft.from_pretrained("random:t5-tiny", method, rng=jax.random.PRNGKey(1))
    trainable, frozen = method.partition(params)
    tx, schedule = make_optimizer(1e-2, 1, len(batches))
    strategy = make_strategy(strategy_name, jax.devices()[:num_devices])
    step = strategy.compile_train_step(
        make_train_step(seq2seq_apply_fn(model), tx, merge_fn=method.combine,
                        schedule=schedule, per_example_dropout=per_example_dropout))
    state = strategy.replicate(TrainState.create(trainable, tx, 7))
    frozen = strategy.put_frozen(frozen)
    losses = []
    for batch in batches:
        state, metrics = step(state, frozen, strategy.shard_batch(batch))
        losses.append(float(strategy.unreplicate(metrics)["loss"]))
    return losses, strategy.unreplicate(state.params)


def assert_same(run_a, run_b, label):
    (losses_a, params_a), (losses_b, params_b) = run_a, run_b
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5, err_msg=label)
    for a, b in zip(jax.tree_util.tree_leaves(params_a), jax.tree_util.tree_leaves(params_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=label)


@pytest.mark.long  # ~85 s; the toy 1-device/jit-4/pmap-4 equality (test_train_parallel.py) runs by default
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")
def test_default_dropout_jit_and_pmap_on_1_and_4_devices_agree():
    batches = random_batches(3)
    one = run("jit", 1, batches, per_example_dropout=False)
    assert one[0][-1] < one[0][0]  # dropout is on; it still learns this batch set
    assert_same(run("jit", 4, batches, per_example_dropout=False), one, "jit x4")
    assert_same(run("pmap", 4, batches, per_example_dropout=False), one, "pmap x4")


@pytest.mark.long  # ~75 s; the toy pmap/jit equality (test_train_parallel.py) runs by default
@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")
def test_per_example_keys_make_pmap_equal_to_one_device():
    batches = random_batches(3)
    one = run("jit", 1, batches, per_example_dropout=True)
    assert_same(run("pmap", 4, batches, per_example_dropout=True), one, "pmap x4")
