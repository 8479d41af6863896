"""Scoring fixed answers instead of generating them: rank classification (T0, T-Few, seqio).

For a task with a fixed label set, every label string is scored by the log-likelihood the
model gives it (the sum of its tokens' log-probabilities, EOS included) and the best one is
the prediction. The encoder runs once per batch; the decoder once per candidate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from compacter_jax.models.t5 import T5ForConditionalGeneration, shift_right

Array = jax.Array


def _scores(model: T5ForConditionalGeneration, params, input_ids: Array, attention_mask: Array,
            candidates: Array, candidate_mask: Array) -> Array:
    variables = {"params": params}
    enc, enc_mask = model.apply(variables, input_ids, attention_mask, return_mask=True,
                                method=model.encode)
    batch = input_ids.shape[0]
    out = []
    for k in range(candidates.shape[0]):  # a handful of labels: unrolled
        labels = jnp.broadcast_to(candidates[k], (batch, candidates.shape[1]))
        mask = jnp.broadcast_to(candidate_mask[k], labels.shape)
        logits = model.apply(variables, shift_right(labels, model.config.decoder_start_token_id),
                             enc, enc_mask, mask, method=model.decode)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        out.append(jnp.sum(token * mask, axis=-1))
    return jnp.stack(out, axis=-1)


@functools.lru_cache(maxsize=32)
def _compiled(model: T5ForConditionalGeneration):
    return jax.jit(functools.partial(_scores, model))


def candidate_log_likelihoods(model: T5ForConditionalGeneration, params, input_ids: Array,
                              attention_mask: Array, candidates: Array,
                              candidate_mask: Array) -> Array:
    """log p(candidate k | input b), summed over the candidate's tokens.

    Args:
      input_ids, attention_mask: int32 [B, S].
      candidates, candidate_mask: int32 [K, T], the tokenised label strings (EOS included)
        and their masks (1 = real token).
    Returns:
      float32 [B, K].
    """
    args = [jnp.asarray(x, jnp.int32) for x in (input_ids, attention_mask, candidates,
                                                candidate_mask)]
    if args[2].ndim != 2 or args[2].shape != args[3].shape:
        raise ValueError(f"candidates {args[2].shape} and candidate_mask {args[3].shape} must "
                         "be the same [K, T]")
    try:
        fn = _compiled(model)
    except TypeError:  # unhashable hooks: compile without the cache
        fn = jax.jit(functools.partial(_scores, model))
    return fn(params, *args)


def rank_classify(model: T5ForConditionalGeneration, params, input_ids: Array,
                  attention_mask: Array, candidates: Array, candidate_mask: Array) -> Array:
    """Index (int32 [B]) of the most likely candidate for each input (see
    `candidate_log_likelihoods` for the arguments)."""
    scores = candidate_log_likelihoods(model, params, input_ids, attention_mask, candidates,
                                       candidate_mask)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
