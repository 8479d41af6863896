"""SparseAdapter (peft/sparsity.py): pruning at initialisation, masks kept through training.

References: SNIP scores against |w * dL/dw| with the gradient computed here by jax.grad of an
explicit loss; the kept set against numpy's own ranking; counts against the shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from compacter_jax import peft
from compacter_jax.peft import sparsity
from compacter_jax.train import make_optimizer
from compacter_jax.train.step import loss_fn as token_loss


def tiny(method_name, **overrides):
    method = peft.get_method(method_name, **overrides)
    model, params = peft.from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(0))
    trainable, frozen = method.partition(params)
    return method, model, trainable, frozen


def batch(seed=0, b=4, s=7, t=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(2, 100, (b, t)).astype(np.int32)
    return {"input_ids": rng.integers(2, 100, (b, s)).astype(np.int32),
            "attention_mask": np.ones((b, s), np.int32), "labels": labels,
            "decoder_input_ids": np.concatenate([np.zeros((b, 1), np.int32), labels[:, :-1]], 1),
            "decoder_attention_mask": np.ones((b, t), np.int32)}


def make_loss(model, method, frozen):
    def loss(params, b):
        logits = model.apply({"params": method.combine(params, frozen)}, b["input_ids"],
                             b["attention_mask"], b["decoder_input_ids"],
                             b["decoder_attention_mask"], deterministic=True)
        return token_loss(logits, b["labels"], b["decoder_attention_mask"])[0]
    return loss


def flat(tree):
    return traverse_util.flatten_dict(dict(tree))


LONG = pytest.mark.long  # the default run keeps Compacter (PHM factors); the rest are long


@pytest.mark.parametrize("name,overrides", [
    pytest.param("adapter", {}, marks=LONG), pytest.param("pfeiffer", {}, marks=LONG),
    pytest.param("lora", {}, marks=LONG), ("compacter", {"reduction_factor": 8}),
    pytest.param("phm_adapter", {"n": 4, "reduction_factor": 8}, marks=LONG)])
def test_masks_survive_20_adamw_steps_exactly(name, overrides):
    method, model, trainable, frozen = tiny(name, sparsity=0.6, prune="random", **overrides)
    loss = make_loss(model, method, frozen)
    pruned, masks = sparsity.prune_at_init(trainable, 0.6, "random", key=jax.random.PRNGKey(1))
    prunable = {p: m for p, m in flat(masks).items() if np.ndim(m)}
    assert prunable and all(sparsity.is_prunable(p) for p in prunable)
    total = sum(m.size for m in prunable.values())
    assert total - sum(int(m.sum()) for m in prunable.values()) == int(0.6 * total)
    # AdamW with weight decay, clipping and warm-up: the final update is masked.
    tx, _ = make_optimizer(1e-2, 2, 20, weight_decay=0.1)
    tx = optax.chain(tx, sparsity.keep_pruned(masks))
    params, state = pruned, tx.init(pruned)
    step = jax.jit(lambda p, s, b: tx.update(jax.grad(loss)(p, b), s, p))
    for i in range(20):
        updates, state = step(params, state, batch(i))
        params = optax.apply_updates(params, updates)
    after, before = flat(params), flat(pruned)
    for p, m in prunable.items():
        w = np.asarray(after[p])
        assert np.all(w[np.asarray(m) == 0] == 0.0), p          # exactly zero
        kept = np.asarray(m) == 1
        assert np.any(w[kept] != np.asarray(before[p])[kept]), p  # the rest trains
    assert (method.trainable_count(method.combine(trainable, frozen))   # counts the full tree
            == sparsity.trained_count(trainable, masks))


def test_snip_scores_equal_w_times_gradient():
    method, model, trainable, frozen = tiny("adapter")
    loss = make_loss(model, method, frozen)
    batches = [batch(0), batch(1)]
    score = sparsity.scores("snip", trainable, key=jax.random.PRNGKey(0), loss_fn=loss,
                            batches=batches)
    grad = jax.jit(jax.grad(loss))
    g0, g1 = (flat(grad(trainable, b)) for b in batches)
    w = flat(trainable)
    assert set(score) == {p for p in w if sparsity.is_prunable(p)}
    for p, s in score.items():
        want = np.abs(np.asarray(w[p], np.float64) * (np.asarray(g0[p], np.float64)
                                                       + np.asarray(g1[p], np.float64)) / 2)
        np.testing.assert_allclose(np.asarray(s), want, rtol=1e-5,
                                   atol=1e-6 * float(np.abs(want).max()))
    # The mask keeps exactly the highest scores (ranking by numpy over all leaves).
    masks = sparsity.masks_from_scores(score, 0.7, jax.random.PRNGKey(3))
    all_scores = np.concatenate([np.asarray(score[p]).ravel() for p in sorted(score)])
    all_masks = np.concatenate([np.asarray(masks[p]).ravel() for p in sorted(score)])
    threshold = np.sort(all_scores)[int(0.7 * all_scores.size)]
    assert all_masks.sum() == all_scores.size - int(0.7 * all_scores.size)
    assert np.all(all_scores[all_masks == 1] >= np.sort(all_scores)[int(0.7 * all_scores.size) - 1])
    assert np.all(all_scores[all_masks == 0] <= threshold)


@pytest.mark.long
def test_magnitude_and_grasp_and_errors():
    method, model, trainable, frozen = tiny("lora")
    loss = make_loss(model, method, frozen)
    mag = sparsity.scores("magnitude", trainable, key=jax.random.PRNGKey(0))
    for p, s in mag.items():
        np.testing.assert_array_equal(np.asarray(s), np.abs(np.asarray(flat(trainable)[p])))
    grasp = sparsity.scores("grasp", trainable, key=jax.random.PRNGKey(0), loss_fn=loss,
                            batches=[batch(0)])
    assert set(grasp) == set(mag)
    with pytest.raises(ValueError, match="needs the training loss"):
        sparsity.scores("snip", trainable, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="sparsity=1.0"):
        peft.get_method("adapter", sparsity=1.0)
    with pytest.raises(ValueError, match="prune='foo'"):
        peft.get_method("lora", sparsity=0.5, prune="foo")


def test_errors():
    with pytest.raises(ValueError, match="sparsity=1.0"):
        peft.get_method("adapter", sparsity=1.0)
    with pytest.raises(ValueError, match="prune='foo'"):
        peft.get_method("lora", sparsity=0.5, prune="foo")


def test_counts_report_non_zeros_and_large_sparse_budget():
    from compacter_jax.params import report, resolve_model
    t5 = resolve_model("random:t5-base")
    dense, sparse = report(t5, peft.get_method("adapter")), report(t5, peft.get_method(
        "sparse_adapter"))
    large = report(t5, peft.get_method("large_sparse_adapter"))
    # T5-base Houlsby adapters: 2 per block x 24 blocks, kernels 768x24 + 24x768.
    kernels = 48 * 2 * 768 * 24
    assert dense.trainable - sparse.trainable == int(0.4 * kernels)
    # Twice the bottleneck, half pruned: the dense budget up to the wider down-biases.
    assert large.trainable - dense.trainable == 48 * 24


@pytest.mark.long  # test_every_task_and_method's sparse_adapter run writes an export too
def test_exports_store_the_mask_and_loads_check_it(tmp_path):
    method, _, trainable, _ = tiny("lora", sparsity=0.5, prune="magnitude")
    pruned, masks = sparsity.prune_at_init(trainable, 0.5, "magnitude",
                                           key=jax.random.PRNGKey(0))
    record = sparsity.export_masks(pruned, masks)
    assert set(record) == {"/".join(p) for p in flat(pruned) if sparsity.is_prunable(p)}
    peft.save_adapter(tmp_path / "ok", pruned, method, model="random:t5-tiny",
                      sparsity_masks=record)
    _, params = peft.load_adapter(tmp_path / "ok")
    key = sorted(record)[0]
    loaded = flat(params)[tuple(key.split("/"))]
    np.testing.assert_array_equal(loaded, flat(pruned)[tuple(key.split("/"))])
    # A weight moved off zero where the mask pruned it: refused on load, naming the tensor.
    tampered = flat(pruned)
    m = np.asarray(flat(masks)[tuple(key.split("/"))])
    w = np.asarray(tampered[tuple(key.split("/"))]).copy()
    w[m == 0] = 1e-3
    tampered[tuple(key.split("/"))] = jnp.asarray(w)
    peft.save_adapter(tmp_path / "bad", traverse_util.unflatten_dict(tampered), method,
                      model="random:t5-tiny", sparsity_masks=record)
    with pytest.raises(peft.AdapterFileError, match="non-zero where the stored sparsity mask"):
        peft.load_adapter(tmp_path / "bad")


def test_erdos_renyi_budgets():
    """Per-tensor kept counts follow (i + o) / (i o), capped, summing to the budget."""
    sizes = {("a",): (64, 8), ("b",): (8, 64), ("c",): (4, 16, 2), ("d",): (2, 2)}
    keep = sparsity.erdos_renyi_keep(sizes, 300)
    assert sum(keep.values()) == 300 and keep[("d",)] == 4             # tiny one: capped
    assert abs(keep[("a",)] - keep[("b",)]) <= 1                      # same (i + o) / (i o)
    eps = keep[("a",)] / (72 / 512 * 512)
    assert abs(keep[("c",)] - eps * (18 / 32) * 128) <= 1
    params = {"enc": {"adapter": {"down": {"kernel": jnp.ones((64, 8))},
                                  "up": {"kernel": jnp.ones((8, 64))}}}}
    pruned, masks = sparsity.prune_at_init(params, 0.75, "erdos_renyi",
                                           key=jax.random.PRNGKey(0))
    assert sparsity.trained_count(pruned, masks) == 1024 - int(0.75 * 1024)
    assert int(np.sum(np.asarray(pruned["enc"]["adapter"]["down"]["kernel"]) != 0)) == 128
