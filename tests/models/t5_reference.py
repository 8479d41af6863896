"""Helpers for the T5 tests: tiny HF PyTorch reference models and padded batches."""

from __future__ import annotations

import numpy as np
import pytest


def tiny_hf_kwargs(**overrides) -> dict:
    """HF T5Config kwargs of a tiny model (vocab 64, d_model 32, 2 layers)."""
    kw = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
              feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0)
    kw.update(overrides)
    return kw


def make_hf_model(seed: int = 0, **overrides):
    """A randomly initialised HF PyTorch T5ForConditionalGeneration (eval mode)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.T5Config(**tiny_hf_kwargs(**overrides))
    return transformers.T5ForConditionalGeneration(cfg).eval()


def padded_batch(vocab: int, batch: int = 3, src: int = 11, tgt: int = 7, seed: int = 0):
    """Random int32 encoder/decoder ids with right padding in some rows (0 = pad)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(2, vocab, (batch, src)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, src - 4:] = 0
    mask[-1, 3:] = 0
    ids[mask == 0] = 0
    dec = rng.randint(2, vocab, (batch, tgt)).astype(np.int32)
    dmask = np.ones_like(dec)
    dmask[-1, tgt - 3:] = 0
    dec[dmask == 0] = 0
    return ids, mask, dec, dmask


# Tests compile many tiny programs: unoptimised XLA code compiles several times faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def fast_jit(fn=None, **kwargs):
    """`jax.jit` with FAST_COMPILE options (usable as a decorator, with or without kwargs)."""
    import jax

    if fn is None:
        return lambda f: jax.jit(f, compiler_options=FAST_COMPILE, **kwargs)
    return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def apply_logits(model, params, *batch):
    """`model.apply({"params": params}, *batch)` (deterministic), jit-compiled fast."""
    return _apply_logits(model, params, tuple(batch))


def _apply_logits_impl(model, params, batch):
    return model.apply({"params": params}, *batch)


_apply_logits = fast_jit(_apply_logits_impl, static_argnums=0)


def random_params(model, seed: int = 0) -> dict:
    """Random float32 params for every leaf of `model` (numpy; no XLA compile).

    Scales keep activations O(1): kernels N(0, 1/fan_in), embeddings N(0, 1), layer-norm
    scales 1 + N(0, 0.1), everything else (biases, PEFT leaves) N(0, 0.1); integer leaves
    (DSEE's sparse places) distinct sorted draws from [0, 4 n).
    """
    import flax.traverse_util as traverse_util
    import jax

    from compacter_jax.models import init_params

    shapes = traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0))))
    rng = np.random.RandomState(seed)
    out = {}
    for path, spec in shapes.items():
        name, shape = path[-1], spec.shape
        if np.issubdtype(spec.dtype, np.integer):  # places (DSEE's sparse_index): distinct
            out[path] = np.sort(rng.permutation(4 * shape[-1])[:shape[-1]]).astype(spec.dtype)
            continue
        if name == "kernel":
            value = rng.normal(0.0, shape[-2] ** -0.5, shape)
        elif name == "embedding":
            value = rng.normal(0.0, 1.0, shape)
        elif name == "scale":
            value = 1.0 + rng.normal(0.0, 0.1, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        out[path] = np.asarray(value, np.float32)
    return traverse_util.unflatten_dict(out)
