"""DSEE (peft/methods/dsee.py): sparse places from the pretrained weight, the update's math
against numpy, the model at init equal to the backbone, and the T5-base count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from compacter_jax import peft
from compacter_jax.peft.methods import dsee
from compacter_jax.peft.methods.dsee import SparseLowRankDelta, sparse_support


def test_support_finds_the_spikes_beside_a_low_rank_weight():
    """W = (rank 3) + 10 spikes: the GoDec split's largest sparse entries are the spikes."""
    rng = np.random.default_rng(0)
    low = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))
    spikes = rng.choice(40 * 30, 10, replace=False)
    w = low.ravel().copy()
    w[spikes] += 4.0 * rng.choice([-1, 1], 10)
    # The largest entries of W itself are mostly not the spikes: the split is needed.
    assert len(set(np.argsort(-np.abs(w))[:10]) & set(spikes)) < 10
    got = sparse_support(w.reshape(40, 30), num_sparse=10, residual_rank=3, iterations=3)
    assert got.dtype == np.int32 and got.tolist() == sorted(spikes.tolist())


def test_delta_equals_numpy():
    rng = np.random.default_rng(1)
    module = SparseLowRankDelta(features_out=6, rank=2, alpha=8.0, num_sparse=5)
    x = jnp.asarray(rng.standard_normal((3, 4, 7)), jnp.float32)
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    assert float(jnp.abs(module.apply({"params": params}, x)).max()) == 0.0  # zero at init
    a, b = rng.standard_normal((7, 2)), rng.standard_normal((2, 6))
    values, index = rng.standard_normal(5), np.array([0, 8, 13, 20, 41], np.int32)
    params = {"lora_a": a, "lora_b": b, "sparse_values": values, "sparse_index": index}
    got = module.apply({"params": jax.tree_util.tree_map(jnp.asarray, params)}, x)
    s = np.zeros(7 * 6)
    s[index] = values
    want = (np.asarray(x, np.float64) @ (a @ b + s.reshape(7, 6))) * (8.0 / 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.long  # test_every_task_and_method trains the dsee preset in the default run
def test_model_places_from_the_backbone_and_starts_at_it():
    method = peft.get_method("dsee", rank_fraction=0.25, num_sparse=4)
    model, params = peft.from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(params)
    indices = {k: v for k, v in flat.items() if k[-1] == "sparse_index"}
    assert len(indices) == 2 * 3 * 2  # q, v in enc self, dec self and cross; 2 blocks
    for path, index in indices.items():
        kernel = np.asarray(flat[path[:-2] + (path[-2][0], "kernel")])
        np.testing.assert_array_equal(index, sparse_support(kernel, 4, round(0.25 * 32)))
    trainable, frozen = method.partition(params)
    names = {k[-1] for k in traverse_util.flatten_dict(trainable)}
    assert names == {"lora_a", "lora_b", "sparse_values"}
    _, backbone = peft.from_pretrained("random:t5-tiny", None, jax.random.PRNGKey(0))
    ids = jnp.array([[5, 6, 7, 1]])
    mask = jnp.ones_like(ids)
    plain = peft.build_model(model.config, peft.Method(name="backbone"))
    np.testing.assert_array_equal(
        model.apply({"params": params}, ids, mask, ids, mask, deterministic=True),
        plain.apply({"params": backbone}, ids, mask, ids, mask, deterministic=True))


def test_t5_base_count():
    from compacter_jax.params import report, resolve_model
    r = report(resolve_model("random:t5-base"), peft.get_method("dsee"))
    # q and v of 36 attention sublayers: rank 16 factors (768 + 768) * 16, 16 sparse values.
    assert r.trainable == 72 * ((768 + 768) * 16 + 16) == 1_770_624


@pytest.mark.long  # DSEE's optional second half; benchmarks/dsee_pruning.py measures it
def test_merge_and_prune_final_weights():
    """Merging the updates into the projections keeps the logits; pruning zeroes exactly the
    asked fraction of each merged projection (its smallest entries)."""
    method = peft.get_method("dsee", rank_fraction=0.25, num_sparse=4, rank=2)
    model, params = peft.from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(params)
    for k, v in flat.items():  # a "trained" update: every DSEE leaf non-zero
        if k[-1] in ("lora_b", "sparse_values"):
            flat[k] = jnp.asarray(0.05 * rng.standard_normal(v.shape), v.dtype)
    params = traverse_util.unflatten_dict(flat)
    ids = jnp.array([[5, 6, 7, 8, 1]])
    mask = jnp.ones_like(ids)
    run = lambda p: np.asarray(model.apply({"params": p}, ids, mask, ids, mask,  # noqa: E731
                                           deterministic=True), np.float64)
    before = run(params)
    merged = dsee.merge_and_prune(params, method, 0.0)
    np.testing.assert_allclose(run(merged), before, rtol=1e-4,
                               atol=1e-4 * np.abs(before).max())
    pruned = traverse_util.flatten_dict(dsee.merge_and_prune(params, method, 0.3))
    m = traverse_util.flatten_dict(merged)
    for k, v in pruned.items():
        if k[-2] in method.targets and k[-1] == "kernel":
            v, full = np.asarray(v), np.asarray(m[k])
            assert np.sum(v == 0) == int(0.3 * v.size)
            assert np.abs(full[v == 0]).max() <= np.abs(full[v != 0]).min()
    assert np.isfinite(run(traverse_util.unflatten_dict(pruned))).all()
