"""One device, 4 devices under jit and 4 under pmap train a Compacter++ T5 identically."""

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


def run(strategy_name, num_devices, batches):
    model, params = peft.from_pretrained_with_method(
        "random:t5-tiny", "compacter++", reduction_factor=8, rng=jax.random.PRNGKey(1))
    config = peft.get_method("compacter++", reduction_factor=8)
    trainable, frozen = peft.split(params, peft.label_params(params, config))
    tx, schedule = make_optimizer(1e-2, 1, len(batches))
    strategy = make_strategy(strategy_name, jax.devices()[:num_devices])
    step = strategy.compile_train_step(
        make_train_step(seq2seq_apply_fn(model), tx, schedule=schedule))
    state = strategy.replicate(TrainState.create(trainable, tx, 7))
    frozen = strategy.put_frozen(frozen)
    losses = []
    for batch in batches:
        state, metrics = step(state, frozen, strategy.shard_batch(batch))
        losses.append(float(strategy.unreplicate(metrics)["loss"]))
    return losses, strategy.unreplicate(state.params)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 (fake CPU) devices")
def test_one_device_jit_and_pmap_agree():
    batches = random_batches(3)
    ref_losses, ref_params = run("jit", 1, batches)
    assert ref_losses[-1] < ref_losses[0]  # dropout is on; it still learns this batch set
    for name in ("jit", "pmap"):
        losses, params = run(name, 4, batches)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
