"""Packing changes the layout, not the recipe: with dropout off one step of the library's train
step on packed real rows gives the loss and trainable gradients of the padded batch of the same
examples; bucketed evaluation gives the predictions of unbucketed evaluation, in order."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.models import greedy_generate
from compacter_jax.train import TrainState, make_train_step, seq2seq_apply_fn
from compacter_jax.train.step import loss_fn
from experiments.evaluation import Evaluator

B, S = 16, 128
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def rows(files_source, tokenizer):
    # RTE pairs are long (two share a row at best), SST-2 sentences short (many per row).
    rte = sorted(files_source.load("rte", "train")[:200],
                 key=lambda ex: len(ex["sentence1"]) + len(ex["sentence2"]))[:B]
    sst2 = files_source.load("sst2", "train")[:B]
    return (data_lib.encode("rte", rte, tokenizer, max_source_length=S, max_target_length=4,
                            train=True),
            data_lib.encode("sst2", sst2, tokenizer, max_source_length=S, max_target_length=4,
                            train=True))


@pytest.fixture(scope="module")
def model_and_method():
    method = peft.get_method("compacter++", reduction_factor=8)
    model, params = peft.from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(0))
    model = model.clone(config=model.config.replace(dropout_rate=0.0))
    # Non-zero PEFT parameters so that every adapter path carries gradient.
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_unflatten(tree, [
        x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype) for x in leaves])
    return model, method, params


@pytest.mark.parametrize("task", [0, 1], ids=["rte", "sst2"])
def test_packed_step_equals_padded_step(rows, model_and_method, recorded_gradients, task):
    model, method, params = model_and_method
    encoded = rows[task]
    padded = data_lib.make_batch(encoded, np.arange(B))
    packed = data_lib.pack_batch(padded, max_source_length=S, packed_target_length=16,
                                 row_buckets=(4, 8, 16))
    assert packed["input_ids"].shape[0] < B            # it really packed
    trainable, frozen = method.partition(params)
    tx = recorded_gradients                             # opt_state = the exact mean gradient
    state = TrainState.create(trainable, tx, 0)
    step = make_train_step(seq2seq_apply_fn(model), tx, merge_fn=method.combine)

    def run(batch):
        new_state, metrics = jax.jit(step)(state, frozen, batch)
        return metrics, new_state.opt_state

    m_pad, g_pad = run(padded)
    m_pack, g_pack = run(packed)
    assert float(m_pack["tokens"]) == float(m_pad["tokens"])
    # Each example's own mean gradient G_e (a padded batch of one, vmapped over the 16 rows).
    rows_of_one = jax.tree_util.tree_map(lambda x: x[:, None], dict(padded))
    per_example = jax.vmap(lambda b: run(b)[1])(rows_of_one)
    tokens = np.asarray(padded["decoder_attention_mask"], np.float64).sum(axis=1)
    assert float(m_pad["tokens"]) == tokens.sum()

    # Tolerances from float32 precision and the magnitudes, not from a machine's printout.
    # The loss is a mean of positive token cross-entropies: no cancellation, so packing (a
    # different order of the same float32 sums: over <= S positions, d_model features, the
    # vocabulary's log-sum-exp) moves it by a few eps32 * sqrt(S) relative at most.
    np.testing.assert_allclose(float(m_pack["loss"]), float(m_pad["loss"]),
                               rtol=4 * EPS32 * np.sqrt(S))
    # The mean gradient is g = sum_e n_e G_e / N over examples e with n_e label tokens. Summed
    # in another order (and through other attention shapes), each element moves by about
    # eps32 * sqrt(S) times the size of its terms, M = sum_e n_e |G_e| / N (>= |g|: it keeps
    # the scale a cancelling sum had; S bounds the longest float32 reduction feeding one term).
    # Leaf norms: ||g_pack - g_pad|| <= 2 eps32 sqrt(S) ||M|| (~2.7e-6 ||M||, 7x what AVX2 and
    # AVX-512 both show); a real packing bug (attention across segments, shifted positions,
    # lost tokens) moves the gradient by percent.
    weights = tokens / tokens.sum()
    leaves = zip(jax.tree_util.tree_leaves_with_path(g_pad), jax.tree_util.tree_leaves(g_pack),
                 jax.tree_util.tree_leaves(per_example))
    for (path, pad), pack, each in leaves:
        pad, pack, each = (np.asarray(x, np.float64) for x in (pad, pack, each))
        scale = np.linalg.norm(np.tensordot(weights, np.abs(each), axes=1))
        np.testing.assert_allclose(np.tensordot(weights, each, axes=1), pad,
                                   rtol=0, atol=8 * EPS32 * np.sqrt(S) * scale)
        assert scale > 0, jax.tree_util.keystr(path)
        err = np.linalg.norm(pack - pad)
        assert err <= 2 * EPS32 * np.sqrt(S) * scale, (jax.tree_util.keystr(path), err, scale)


def test_bucketed_evaluation_gives_the_unbucketed_predictions_in_order(rows, model_and_method,
                                                                        tokenizer):
    model, _, params = model_and_method
    encoded = rows[1]
    evaluator = Evaluator(data_lib.get_task("sst2"), tokenizer, model, {"validation": encoded},
                          batch_size=5, max_new_tokens=4)
    bucketed = evaluator.generate(params, "validation")
    plain = [""] * len(encoded)
    for batch in data_lib.eval_batches(encoded, 5):
        ids = greedy_generate(model, params, batch["input_ids"], batch["attention_mask"],
                              max_new_tokens=4)
        for row, text in zip(batch["example_index"],
                             data_lib.decode_predictions(tokenizer, np.asarray(ids))):
            if row >= 0:
                plain[row] = text
    assert bucketed == plain
    shapes = {b["input_ids"].shape[1] for b in data_lib.bucketed_eval_batches(encoded, 5)}
    assert min(shapes) < S                              # short batches run on short shapes


def test_tight_target_packed_step_equals_padded_step(rows, model_and_method):
    """Tight decoder packing (targets in the shortest of a few lengths that keeps the rows)
    changes the layout only: the same examples give the padded step's loss and gradients."""
    model, method, params = model_and_method
    encoded = rows[1]                                   # SST-2: many short examples per row
    padded = data_lib.make_batch(encoded, np.arange(B))
    kwargs = dict(max_source_length=S, packed_target_length=32, row_buckets=(2, 3, 4, 8))
    loose = data_lib.pack_batch(padded, **kwargs)
    tight = data_lib.pack_batch(padded, target_buckets=tuple(range(4, 32, 2)), **kwargs)
    assert tight["labels"].shape[1] < loose["labels"].shape[1]            # it really cut
    assert tight["input_ids"].shape == loose["input_ids"].shape
    trainable, frozen = method.partition(params)
    apply_fn = seq2seq_apply_fn(model)

    @jax.jit
    def loss_and_grad(batch):                           # gradients directly, no update
        def loss(p):
            logits = apply_fn(method.combine(p, frozen), batch, True, None)
            return loss_fn(logits, batch["labels"], batch["decoder_attention_mask"])
        return jax.value_and_grad(loss, has_aux=True)(trainable)

    (l_pad, n_pad), g_pad = loss_and_grad(padded)
    (l_tight, n_tight), g_tight = loss_and_grad(tight)
    assert float(n_tight) == float(n_pad) == padded["decoder_attention_mask"].sum()
    # float32 sums over a few hundred terms in another order: ~100 eps32, relative; leaves
    # near zero against 100 eps32 of the whole gradient's norm.
    tol = 100 * float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(float(l_tight), float(l_pad), rtol=tol)
    total = float(optax.tree.norm(g_pad))
    assert total > 0
    for a, b in zip(jax.tree_util.tree_leaves(g_tight), jax.tree_util.tree_leaves(g_pad)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= tol * (np.linalg.norm(b) + 1e-3 * total)
