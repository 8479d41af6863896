"""Pure steps: loss against a numpy reference, gradients of the trainable tree only, frozen as
an argument, dropout keys, eval with padded rows, NaN detection."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_toy import make_batch, make_toy

from compacter_jax.peft import partition
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import (
    NonFiniteLossError, loss_fn, make_eval_step, make_train_step, raise_if_nonfinite)


def np_token_ce(logits, labels, mask):
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    return ((logz - picked) * mask).sum() / mask.sum(), mask.sum()


def test_loss_fn_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, (3, 5)).astype(np.int32)
    mask = (rng.random((3, 5)) > 0.3).astype(np.int32)
    loss, n = loss_fn(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), labels, mask)
    ref, ref_n = np_token_ce(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32),
                             labels, mask)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    assert float(n) == ref_n
    zero, n0 = loss_fn(logits, labels, np.zeros_like(mask))
    assert float(zero) == 0.0 and float(n0) == 0.0
    with pytest.raises(ValueError, match="labels"):
        loss_fn(logits, labels[:, :4], mask)


def test_train_step_grads_only_trainable_and_match_reference(toy_no_dropout,
                                                              recorded_gradients):
    toy = toy_no_dropout
    tx = recorded_gradients                 # state.opt_state = the step's exact mean gradient
    step = jax.jit(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge))
    batch = make_batch(np.random.default_rng(3), 4)
    state = TrainState.create(toy.trainable, tx, 0)
    new, metrics = step(state, toy.frozen, batch)

    def token_losses(trainable, batch):
        logits = toy.apply_fn(partition.merge(trainable, toy.frozen), batch, True, None)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        return ce * batch["decoder_attention_mask"]

    def ref_loss(trainable):  # the plain formulation: mean over real tokens of the batch
        m = batch["decoder_attention_mask"]
        return token_losses(trainable, batch).sum() / m.sum()

    loss, grads = jax.jit(jax.value_and_grad(ref_loss))(toy.trainable)
    n = float(batch["decoder_attention_mask"].sum())
    # Tolerances from float32 precision: the loss is a mean of n positive terms (no
    # cancellation): a few eps32 * sqrt(n) relative. Each gradient element is a sum of
    # per-example terms G_e / n, rounded in another order by the two programs: bounded by
    # eps32 * sqrt(n) times the size of the terms, sum_e |G_e| / n (the leaf's norm can be
    # far smaller when they cancel).
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=4 * eps * np.sqrt(n))
    assert float(metrics["tokens"]) == n
    assert float(metrics["finite"]) == 1.0 and int(new.step) == 1
    assert jax.tree_util.tree_structure(new.params) == jax.tree_util.tree_structure(toy.trainable)
    one = jax.tree_util.tree_map(lambda x: np.asarray(x)[:, None], batch)
    per_example = jax.jit(jax.vmap(jax.grad(lambda t, b: token_losses(t, b).sum()), (None, 0)))(
        toy.trainable, one)
    for g, r, e in zip(*(jax.tree_util.tree_leaves(t) for t in (new.opt_state, grads,
                                                                 per_example))):
        g, r, e = (np.asarray(x, np.float64) for x in (g, r, e))
        scale = np.linalg.norm(np.abs(e).sum(0) / n)
        assert np.linalg.norm(g - r) <= 4 * eps * np.sqrt(n) * scale, (g - r, scale)
        assert np.linalg.norm(e.sum(0) / n - r) <= 4 * eps * np.sqrt(n) * scale
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)),
                               rtol=4 * eps * np.sqrt(n))
    # The old reading of the gradient, sgd(1) and params_before - params_after, agrees within
    # the parameters' own rounding (half an ulp of each parameter).
    sgd = optax.sgd(1.0)
    moved, _ = jax.jit(make_train_step(toy.apply_fn, sgd, merge_fn=partition.merge))(
        TrainState.create(toy.trainable, sgd, 0), toy.frozen, batch)
    for before, after, g in zip(*(jax.tree_util.tree_leaves(t) for t in (
            toy.trainable, moved.params, new.opt_state))):
        before, after = np.asarray(before), np.asarray(after)
        ulp = np.spacing(np.maximum(np.abs(before), np.abs(after)))
        assert np.all(np.abs((before.astype(np.float64) - after) - g) <= ulp)


def test_frozen_is_an_argument_not_a_constant(toy_no_dropout):
    toy = toy_no_dropout
    tx = optax.adam(1e-3)
    train_step = make_train_step(toy.apply_fn, tx, merge_fn=partition.merge)
    batch = make_batch(np.random.default_rng(4), 4)
    state = TrainState.create(toy.trainable, tx, 0)
    jaxpr = jax.make_jaxpr(train_step)(state, toy.frozen, batch)
    const_sizes = [np.size(c) for c in jaxpr.consts]
    assert sum(const_sizes) < 16, const_sizes  # no frozen weight baked into the program
    step = jax.jit(train_step)
    _, m1 = step(state, toy.frozen, batch)
    frozen2 = jax.tree_util.tree_map(lambda x: x * 1.5, toy.frozen)
    _, m2 = step(state, frozen2, batch)  # same compiled program, new frozen values
    assert abs(float(m1["loss"]) - float(m2["loss"])) > 1e-4


def test_dropout_is_on_in_training_and_depends_on_step_and_seed(toy):
    tx = optax.sgd(0.0)
    step = jax.jit(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                   per_example_dropout=True))
    det = jax.jit(make_eval_step(toy.apply_fn, merge_fn=partition.merge))
    batch = make_batch(np.random.default_rng(5), 4)
    s0 = TrainState.create(toy.trainable, tx, 0)
    s1, m0 = step(s0, toy.frozen, batch)
    _, m1 = step(s1, toy.frozen, batch)            # lr 0: same params, next step's masks
    _, m_seed = step(TrainState.create(toy.trainable, tx, 1), toy.frozen, batch)
    _, m_again = step(s0, toy.frozen, batch)
    ev = det(toy.trainable, toy.frozen, batch)
    eval_loss = float(ev["loss_sum"] / ev["tokens"])
    losses = [float(m["loss"]) for m in (m0, m1, m_seed)]
    assert len({round(x, 6) for x in losses + [eval_loss]}) == 4, (losses, eval_loss)
    assert float(m_again["loss"]) == float(m0["loss"])  # reproducible
    # per_example_dropout=False: one key for the batch; also dropout, also reproducible
    step_b = jax.jit(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge))
    _, mb = step_b(s0, toy.frozen, batch)
    assert abs(float(mb["loss"]) - eval_loss) > 1e-6


def test_eval_step_ignores_padded_rows(toy):
    ev = jax.jit(make_eval_step(toy.apply_fn, merge_fn=partition.merge))
    batch = make_batch(np.random.default_rng(6), 3)
    junk = make_batch(np.random.default_rng(7), 2)
    padded = {k: np.concatenate([batch[k], junk[k]]) for k in batch}
    padded["example_mask"] = np.array([1, 1, 1, 0, 0], np.int32)
    a = ev(toy.trainable, toy.frozen, batch)
    b = ev(toy.trainable, toy.frozen, padded)
    # A sum of n positive terms in another order (other shape): at most (n - 1) eps32 relative
    # apart, plus each term's own few-eps change under another batch shape: 2 n eps32.
    n = float(batch["decoder_attention_mask"].sum())
    np.testing.assert_allclose(float(a["loss_sum"]), float(b["loss_sum"]),
                               rtol=2 * n * np.finfo(np.float32).eps)
    assert float(a["tokens"]) == float(b["tokens"]) == batch["decoder_attention_mask"].sum()
    assert float(b["examples"]) == 3.0
    logits = toy.apply_fn(partition.merge(toy.trainable, toy.frozen), batch, True, None)
    ref, _ = np_token_ce(np.asarray(logits), batch["labels"], batch["decoder_attention_mask"])
    np.testing.assert_allclose(float(a["loss_sum"] / a["tokens"]), ref, rtol=1e-5)


def test_nonfinite_loss_is_flagged_and_raised(toy_no_dropout):
    toy = toy_no_dropout
    tx = optax.adam(1e-3)
    step = jax.jit(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge))
    batch = make_batch(np.random.default_rng(8), 4)
    bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), toy.frozen)
    state = TrainState.create(toy.trainable, tx, 0)
    state, ok = step(state, toy.frozen, batch)
    _, m = step(state, bad, batch)
    assert float(ok["finite"]) == 1.0 and float(m["finite"]) == 0.0
    raise_if_nonfinite([(1, ok)])
    with pytest.raises(NonFiniteLossError, match="update 2") as err:
        raise_if_nonfinite([(1, ok), (2, m)])
    assert err.value.step == 2


def test_state_create_accepts_typed_keys():
    toy = make_toy(dropout=0.0)
    tx = optax.sgd(0.1)
    a = TrainState.create(toy.trainable, tx, jax.random.key(3))
    b = TrainState.create(toy.trainable, tx, 3)
    assert a.rng.dtype == jnp.uint32 and np.array_equal(a.rng, b.rng)
    with pytest.raises(ValueError, match="rng"):
        TrainState.create(toy.trainable, tx, jnp.zeros(3))
