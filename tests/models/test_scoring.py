"""Rank classification: each candidate's score is its summed token log-probability under the
model (checked against full-model logits computed directly), and the best one is picked."""

import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models import (T5ForConditionalGeneration, candidate_log_likelihoods,
                                  get_preset, init_params, rank_classify, shift_right)

CFG = get_preset("t5-tiny").replace(vocab_size=50)


def test_scores_are_summed_log_probs_and_argmax_is_picked():
    model = T5ForConditionalGeneration(CFG)
    params = init_params(model, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 50, (3, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    ids = ids * mask
    cands = np.array([[3, 9, 1, 0], [3, 11, 12, 1], [5, 1, 0, 0]], np.int32)   # ragged labels
    cmask = (cands != 0).astype(np.int32)
    scores = np.asarray(candidate_log_likelihoods(model, params, ids, mask, cands, cmask))
    assert scores.shape == (3, 3)
    want = np.zeros((3, 3))
    for k in range(3):
        labels = np.repeat(cands[k:k + 1], 3, axis=0)
        logits = model.apply({"params": params}, ids, mask, shift_right(labels),
                             np.repeat(cmask[k:k + 1], 3, axis=0))
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
        for b in range(3):
            want[b, k] = sum(logp[b, t, cands[k, t]] for t in range(4) if cmask[k, t])
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rank_classify(model, params, ids, mask, cands, cmask),
                                  want.argmax(-1))
    assert len(set(want.argmax(-1).tolist())) > 1 or np.ptp(want) > 0   # not a constant pick
    # Padding a candidate with extra masked tokens changes nothing.
    longer = np.pad(cands, ((0, 0), (0, 2)))
    np.testing.assert_allclose(candidate_log_likelihoods(
        model, params, ids, mask, longer, (longer != 0).astype(np.int32)), scores, rtol=1e-5,
        atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(scores)))
