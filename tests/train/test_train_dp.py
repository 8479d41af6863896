"""The DP train step: per-example clipped gradients against a python loop over single
examples, padding rows, the noise, equality with the non-DP step at noise 0 / clip inf, the
jit Mesh strategy over 4 devices, and Poisson sampling."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_toy import TGT, make_batch

from compacter_jax.peft import partition
from compacter_jax.train.dp import (
    make_dp_train_step, pad_rows, padded_rows, poisson_sample)
from compacter_jax.train.parallel import make_strategy
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import make_train_step

EPS32 = float(np.finfo(np.float32).eps)


def capture_grads() -> optax.GradientTransformation:
    """Zero updates; the state is the last gradient, exactly as the step handed it over."""
    return optax.GradientTransformation(
        lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree_util.tree_map(jnp.zeros_like, g), g))


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree_util.tree_leaves(tree)])


def loop_reference(toy, batch, mask, clip, expected, rng, step=0):
    """sum over sampled rows of clip(grad of that example's token-mean loss, alone, with its
    own dropout key fold_in(fold_in(rng, step), row)) / expected, in float64 after the grad."""
    base = jax.random.fold_in(jax.random.PRNGKey(rng), step)

    @jax.jit
    def grad_one(trainable, one, key):
        def loss(trainable):
            logits = toy.apply_fn(partition.merge(trainable, toy.frozen), one, False,
                                  {"dropout": key})
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, one["labels"])
            m = one["decoder_attention_mask"]
            return (ce * m).sum() / m.sum()
        return jax.grad(loss)(trainable)

    total, norms = 0.0, []
    for i in np.flatnonzero(mask):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        g = flat(grad_one(toy.trainable, one, jax.random.fold_in(base, i)))
        norms.append(np.linalg.norm(g))
        total = total + g * min(1.0, clip / norms[-1])
    return total / expected, np.array(norms)


def test_dp_grads_equal_a_loop_over_single_examples_with_clipping(toy):
    batch = make_batch(np.random.default_rng(11), 6)
    mask = np.array([1, 1, 0, 1, 1, 0], np.int32)
    # Junk in the padding rows: they must not count at all.
    batch = {k: np.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)) == 1, v, v[::-1])
             for k, v in batch.items()}
    _, norms = loop_reference(toy, batch, mask, np.inf, 1.0, rng=7)
    clip = float(np.median(norms))  # some examples clipped, some not
    ref, _ = loop_reference(toy, batch, mask, clip, 5.0, rng=7)
    tx = capture_grads()
    step = jax.jit(make_dp_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                      clip_norm=clip, noise_multiplier=0.0,
                                      expected_batch_size=5.0))
    state = TrainState.create(toy.trainable, tx, 7)
    new, metrics = step(state, toy.frozen, {**batch, "example_mask": mask})
    got = flat(new.opt_state)
    # Same float32 ops per example in both; vmap may reassociate a few reductions (a few ulps
    # per element) and the sum of 4 clipped terms adds <= 4 roundings: ~8 eps32 of the norm.
    assert np.linalg.norm(got - ref) <= 1e-6 * np.linalg.norm(ref), (
        np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert 1e-6 > 8 * EPS32
    assert float(metrics["examples"]) == 4.0
    chunked = jax.jit(make_dp_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                         clip_norm=clip, noise_multiplier=0.0,
                                         expected_batch_size=5.0, microbatch_size=2))
    got2 = flat(chunked(state, toy.frozen, {**batch, "example_mask": mask})[0].opt_state)
    assert np.linalg.norm(got2 - ref) <= 1e-6 * np.linalg.norm(ref)  # 3 chunks of 2 examples
    assert float(metrics["clipped_fraction"]) == pytest.approx(np.mean(norms > clip))
    # Each clipped example's contribution has norm exactly clip: the mechanism's sensitivity.
    single = np.zeros_like(mask)
    single[np.flatnonzero(mask)[np.argmax(norms)]] = 1  # the largest: clipped
    new1, _ = step(state, toy.frozen, {**batch, "example_mask": single})
    np.testing.assert_allclose(np.linalg.norm(flat(new1.opt_state)) * 5.0, clip, rtol=1e-5)


def test_noise_has_the_calibrated_std_and_is_reproducible(toy_no_dropout):
    toy = toy_no_dropout
    batch = make_batch(np.random.default_rng(12), 4)
    tx = capture_grads()
    kw = dict(merge_fn=partition.merge, clip_norm=0.5, expected_batch_size=4.0)
    quiet = jax.jit(make_dp_train_step(toy.apply_fn, tx, noise_multiplier=0.0, **kw))
    noisy = jax.jit(make_dp_train_step(toy.apply_fn, tx, noise_multiplier=2.0, **kw))
    state = TrainState.create(toy.trainable, tx, 3)
    clean = flat(quiet(state, toy.frozen, batch)[0].opt_state)
    a = flat(noisy(state, toy.frozen, batch)[0].opt_state)
    b = flat(noisy(state, toy.frozen, batch)[0].opt_state)
    noise = (a - clean) * 4.0  # the noise added to the clipped sum
    np.testing.assert_array_equal(a, b)
    n = noise.size  # 544 trainable values: the sample std is within 4/sqrt(2n) ~ 12%
    assert abs(np.std(noise) / (2.0 * 0.5) - 1) < 4 / np.sqrt(2 * n), np.std(noise)
    assert abs(np.mean(noise)) < 4 * 1.0 / np.sqrt(n)
    next_state = state.replace(step=state.step + 1)  # the next step draws other noise
    c = flat(noisy(next_state, toy.frozen, batch)[0].opt_state)
    assert np.corrcoef(c - clean, a - clean)[0, 1] < 0.3


def test_noise_zero_and_clip_inf_is_the_non_dp_step(toy):
    batch = make_batch(np.random.default_rng(13), 4)
    batch["decoder_attention_mask"][:] = 1  # equal target lengths: token mean of the batch
    batch["labels"] = np.where(batch["labels"] == 0, 3, batch["labels"])  # == mean of means
    batch["decoder_input_ids"] = np.concatenate(
        [np.zeros((4, 1), np.int32), batch["labels"][:, :TGT - 1]], 1)
    tx = optax.adam(1e-2)
    plain = jax.jit(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                    per_example_dropout=True))
    dp = jax.jit(make_dp_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                    clip_norm=np.inf, noise_multiplier=0.0,
                                    expected_batch_size=4))
    s_plain = s_dp = TrainState.create(toy.trainable, tx, 5)
    for _ in range(2):
        s_plain, m_plain = plain(s_plain, toy.frozen, batch)
        s_dp, m_dp = dp(s_dp, toy.frozen, batch)
        np.testing.assert_allclose(float(m_dp["loss"]), float(m_plain["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m_dp["grad_norm"]), float(m_plain["grad_norm"]),
                                   rtol=1e-5)
    # Adam normalises the step, so params differ by a few float32 ulps of their scale.
    a, b = flat(s_plain.params), flat(s_dp.params)
    np.testing.assert_allclose(a, b, rtol=0, atol=32 * EPS32 * np.abs(a).max())
    assert np.abs(a - flat(toy.trainable)).max() > 1e-3  # it did move


def test_dp_step_on_the_mesh_equals_one_device(toy):
    if jax.device_count() < 4:
        pytest.skip("needs 4 (fake CPU) devices (tests/conftest.py)")
    batch = make_batch(np.random.default_rng(14), 8)
    batch["example_mask"] = np.array([1, 0, 1, 1, 1, 1, 0, 1], np.int32)
    tx = optax.adam(1e-2)
    train_step = make_dp_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                    clip_norm=0.3, noise_multiplier=1.0, expected_batch_size=6)
    state = TrainState.create(toy.trainable, tx, 9)
    results = {}
    for name, n in (("jit", 1), ("jit", 4), ("pmap", 4)):
        strategy = make_strategy(name, jax.devices()[:n])
        args = (strategy.replicate(state), strategy.put_frozen(toy.frozen),
                strategy.shard_batch(batch))
        compiled = strategy.compile_train_step(train_step, donate=False).lower(*args).compile()
        if (name, n) == ("jit", 4):  # per-example gradients sharded with the batch: each
            # device's program holds [8 / 4, ...] of lm_head's [16, 16] kernel, never [8, ...]
            assert set(re.findall(r"f32\[(\d+),16,16\]", compiled.as_text())) == {"2"}
        new, metrics = compiled(*args)
        results[(name, n)] = (flat(strategy.unreplicate(new.params)),
                              strategy.unreplicate(metrics))
    ref, ref_m = results[("jit", 1)]
    for key, (params, m) in results.items():  # same dropout masks, same noise, same update
        np.testing.assert_allclose(params, ref, rtol=0, atol=32 * EPS32 * np.abs(ref).max(),
                                   err_msg=str(key))
        np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
        assert float(m["examples"]) == 6.0


def test_poisson_sampling():
    n, q = 1000, 0.05
    a = poisson_sample(n, q, seed=1, step=3)
    np.testing.assert_array_equal(a, poisson_sample(n, q, seed=1, step=3))
    assert not np.array_equal(a, poisson_sample(n, q, seed=1, step=4))
    sizes = np.array([len(poisson_sample(n, q, seed=1, step=s)) for s in range(400)])
    # Binomial(1000, 0.05): mean 50, std 6.9; the mean of 400 draws is within 4 * 0.34.
    assert abs(sizes.mean() - n * q) < 4 * np.sqrt(n * q * (1 - q) / 400)
    assert abs(sizes.std() - np.sqrt(n * q * (1 - q))) < 1.5
    counts = np.bincount(np.concatenate([poisson_sample(n, q, 2, s) for s in range(400)]),
                         minlength=n)  # every example equally likely: Binomial(400, q)
    assert abs(counts.mean() - 400 * q) < 0.5 and counts.max() < 400 * q + 8 * np.sqrt(20)
    rows = padded_rows(n, q, multiple_of=4)
    assert rows % 4 == 0 and n * q < rows <= 1.6 * n * q
    assert pad_rows(rows + 1, rows, 4) == rows + 4  # never truncated
    assert pad_rows(3, rows, 4) == rows
    with pytest.raises(ValueError, match="sampling_rate"):
        poisson_sample(n, 0.0, 1, 1)


def test_bad_arguments_are_refused(toy):
    kw = dict(merge_fn=partition.merge, expected_batch_size=4)
    with pytest.raises(ValueError, match="finite clip_norm"):
        make_dp_train_step(toy.apply_fn, optax.sgd(1.0), clip_norm=np.inf,
                           noise_multiplier=1.0, **kw)
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        make_dp_train_step(toy.apply_fn, optax.sgd(1.0), clip_norm=0.0,
                           noise_multiplier=1.0, **kw)
    with pytest.raises(ValueError, match="noise_multiplier"):
        make_dp_train_step(toy.apply_fn, optax.sgd(1.0), clip_norm=1.0,
                           noise_multiplier=-1.0, **kw)
