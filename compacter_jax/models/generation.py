"""Batched greedy decoding with a KV cache (linen "cache" collection), jit-compiled.

Token-identical to HF `generate(do_sample=False, num_beams=1)`: start from
`decoder_start_token_id`, take the argmax each step, rows that produced EOS emit pad (0)
afterwards, and the loop ends once every row is finished or `max_new_tokens` is reached.
Works with scanned layers (the cache is stacked along the layer axis like the params).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from compacter_jax.models.t5 import T5ForConditionalGeneration

Array = jax.Array


def _generate(model: T5ForConditionalGeneration, max_new_tokens: int, eos_id: int, params,
              input_ids: Array, attention_mask: Array) -> Array:
    cfg = model.config
    variables = {"params": params}
    enc, enc_mask = model.apply(variables, input_ids, attention_mask, return_mask=True,
                                method=model.encode)
    batch = input_ids.shape[0]
    # Creating the cache: the decoder pass on dummy ids is dead code that XLA removes; what
    # remains are zero self-attention caches and the projected encoder keys/values.
    dummy = jnp.zeros((batch, max_new_tokens), jnp.int32)
    _, state = model.apply(variables, dummy, enc, enc_mask, decode=True, method=model.decode,
                           mutable=["cache"])

    def cond(carry):
        step, _, _, finished, _ = carry
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(carry):
        step, token, cache, finished, out = carry
        logits, state = model.apply({"params": params, "cache": cache}, token[:, None], enc,
                                    enc_mask, decode=True, method=model.decode,
                                    mutable=["cache"])
        nxt = jnp.argmax(logits[:, -1, :], axis=-1).astype(jnp.int32)
        nxt = jnp.where(finished, cfg.pad_token_id, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, step))
        return step + 1, nxt, state["cache"], finished | (nxt == eos_id), out

    start = jnp.full((batch,), cfg.decoder_start_token_id, jnp.int32)
    out = jnp.full((batch, max_new_tokens), cfg.pad_token_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), start, state["cache"], jnp.zeros((batch,), bool), out)
    return jax.lax.while_loop(cond, body, carry)[-1]


@functools.lru_cache(maxsize=32)
def _compiled(model: T5ForConditionalGeneration, max_new_tokens: int, eos_id: int):
    return jax.jit(functools.partial(_generate, model, max_new_tokens, eos_id))


def greedy_generate(model: T5ForConditionalGeneration, params, input_ids: Array,
                    attention_mask: Array, max_new_tokens: int, eos_id: int = 1) -> Array:
    """Greedy decoding. input_ids/attention_mask: int32 [B, S]. Returns int32
    [B, max_new_tokens]: generated tokens (without the start token), 0 after a row's EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    try:
        fn = _compiled(model, int(max_new_tokens), int(eos_id))
    except TypeError:  # unhashable hooks: compile without the cache
        fn = jax.jit(functools.partial(_generate, model, int(max_new_tokens), int(eos_id)))
    return fn(params, input_ids, attention_mask)
