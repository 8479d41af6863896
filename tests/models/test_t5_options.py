"""Runtime options of the Flax T5: parameter names, scan, remat, bfloat16, dropout, methods."""

from __future__ import annotations

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from t5_reference import fast_jit, padded_batch, random_params

from compacter_jax.models import (T5Config, T5ForConditionalGeneration, init_params,
                                  stack_blocks, unstack_blocks)

V10 = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, dropout_rate=0.1)
V11 = V10.replace(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  scale_decoder_outputs=False)


def _batch():
    return tuple(jnp.asarray(a) for a in padded_batch(64))


# Two float32 programs of the same arithmetic (other fusions, a scan, a split call) differ by
# reordered sums over at most d_ff terms: a few eps32 * sqrt(d_ff) of the values' scale.
CLOSE32 = 4 * float(np.finfo(np.float32).eps) * np.sqrt(V11.d_ff)


def _assert_close(got, want):
    """`got` equals `want` within CLOSE32 of want's largest magnitude."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=CLOSE32 * float(np.abs(want).max()))


@fast_jit(static_argnames=("cfg", "deterministic"))
def _logits(cfg, params, batch, deterministic=True, key=None):
    rngs = None if key is None else {"dropout": key}
    return T5ForConditionalGeneration(cfg).apply({"params": params}, *batch,
                                                 deterministic=deterministic, rngs=rngs)


@pytest.fixture(scope="module")
def v11_params():
    return random_params(T5ForConditionalGeneration(V11))


def test_parameter_names_and_shapes_follow_design():
    flat = traverse_util.flatten_dict(
        jax.eval_shape(lambda: init_params(T5ForConditionalGeneration(V10),
                                           jax.random.PRNGKey(0))), sep="/")
    shapes = {k: v.shape for k, v in flat.items()}
    assert shapes["shared/embedding"] == (64, 32)
    assert shapes["encoder/relative_attention_bias/embedding"] == (8, 4)
    assert shapes["decoder/relative_attention_bias/embedding"] == (8, 4)
    assert shapes["encoder/block_1/layer_0/SelfAttention/q/kernel"] == (32, 32)
    assert shapes["encoder/block_1/layer_0/SelfAttention/o/kernel"] == (32, 32)
    assert shapes["encoder/block_0/layer_1/DenseReluDense/wi/kernel"] == (32, 48)
    assert shapes["encoder/block_0/layer_1/DenseReluDense/wo/kernel"] == (48, 32)
    assert shapes["decoder/block_2/layer_1/EncDecAttention/k/kernel"] == (32, 32)
    assert shapes["decoder/block_2/layer_2/layer_norm/scale"] == (32,)
    assert shapes["decoder/final_layer_norm/scale"] == (32,)
    assert "lm_head/kernel" not in shapes  # tied
    per_block = 4 + 1 + 2 + 1  # q,k,v,o + ln, wi,wo + ln
    n = 1 + 2 + 2 + 2 * per_block + 3 * (per_block + 5)
    assert len(shapes) == n
    untied = traverse_util.flatten_dict(jax.eval_shape(
        lambda: init_params(T5ForConditionalGeneration(V11), jax.random.PRNGKey(0))), sep="/")
    assert untied["lm_head/kernel"].shape == (32, 64)
    assert untied["decoder/block_0/layer_2/DenseReluDense/wi_1/kernel"].shape == (32, 48)
    assert "decoder/block_0/layer_2/DenseReluDense/wi/kernel" not in untied


def test_scan_matches_unscanned(v11_params):
    batch = _batch()
    scanned_cfg = V11.replace(scan_layers=True)
    stacked = stack_blocks(v11_params)
    # the scanned model's own init has exactly this structure
    own = jax.eval_shape(lambda: init_params(T5ForConditionalGeneration(scanned_cfg),
                                             jax.random.PRNGKey(1)))
    assert jax.tree_util.tree_map(lambda x: x.shape, own) == \
        jax.tree_util.tree_map(lambda x: x.shape, stacked)
    assert own["decoder"]["blocks"]["layer_1"]["EncDecAttention"]["q"]["kernel"].shape == \
        (3, 32, 32)
    _assert_close(_logits(scanned_cfg, stacked, batch), _logits(V11, v11_params, batch))
    back = unstack_blocks(stacked)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.array_equal(a, b)), back, v11_params))


def test_remat_and_scan_match_plain_values_and_grads(v11_params):
    """Training-mode loss and gradients: remat and scan+remat == plain."""
    batch = _batch()
    key = jax.random.PRNGKey(3)
    base = V11.replace(dropout_rate=0.0)  # scan splits dropout rngs per layer: compare without

    def value_and_grad(cfg, params):
        model = T5ForConditionalGeneration(cfg)

        def f(p):
            logits = model.apply({"params": p}, *batch, deterministic=False,
                                 rngs={"dropout": key})
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5])
        return fast_jit(jax.value_and_grad(f))(params)

    v0, g0 = value_and_grad(base, v11_params)
    v1, g1 = value_and_grad(base.replace(remat=True), v11_params)
    v2, g2 = value_and_grad(base.replace(remat=True, scan_layers=True), stack_blocks(v11_params))
    assert float(jnp.max(jnp.abs(g0["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]
                                 ["kernel"]))) > 0
    # Remat recomputes, scan loops: CLOSE32 of the scale; for gradients the largest |g| of the
    # tree (every leaf's error comes from the same backward signals, so a leaf whose sum
    # cancels to ~0 still carries that absolute error).
    np.testing.assert_allclose(v1, v0, rtol=CLOSE32)
    np.testing.assert_allclose(v2, v0, rtol=CLOSE32)
    atol = CLOSE32 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
    for got, want in ((g1, g0), (g2, stack_blocks(g0))):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0,
                                                                       atol=atol), got, want)


def test_bfloat16_close_to_float32(v11_params):
    batch = _batch()
    ref = _logits(V11, v11_params, batch)
    low = _logits(V11.replace(dtype="bfloat16"), v11_params, batch)
    assert low.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(low - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    assert err <= 0.03 * scale, (err, scale)  # bf16 has ~3 significant digits
    assert err > 0  # the compute really ran in bfloat16
    # bf16 parameters too
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), v11_params)
    low2 = _logits(V11.replace(dtype="bfloat16", param_dtype="bfloat16"), p16, batch)
    assert float(jnp.max(jnp.abs(low2 - ref))) <= 0.05 * scale


@pytest.mark.parametrize("scan", [False, True])
def test_dropout(v11_params, scan):
    cfg = V11.replace(scan_layers=scan)
    params = stack_blocks(v11_params) if scan else v11_params
    batch = _batch()
    det = _logits(cfg, params, batch)
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a = _logits(cfg, params, batch, deterministic=False, key=k1)
    b = _logits(cfg, params, batch, deterministic=False, key=k1)
    c = _logits(cfg, params, batch, deterministic=False, key=k2)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3 and float(jnp.max(jnp.abs(a - det))) > 1e-3


def test_encode_decode_methods_match_call(v11_params):
    ids, mask, dec, dmask = _batch()
    model = T5ForConditionalGeneration(V11)

    @fast_jit
    def run(params):
        variables = {"params": params}
        enc = model.apply(variables, ids, mask, method=model.encode)
        return (enc, model.apply(variables, dec, enc, mask, dmask, method=model.decode),
                model.apply(variables, ids, mask, dec, dmask))

    enc, split, joint = run(v11_params)
    assert enc.shape == ids.shape + (32,)
    _assert_close(split, joint)


def test_decoder_is_causal_and_ignores_encoder_padding(v11_params):
    ids, mask, dec, dmask = _batch()
    base = _logits(V11, v11_params, (ids, mask, dec, dmask))
    # changing a future decoder token leaves earlier positions unchanged
    out = _logits(V11, v11_params, (ids, mask, dec.at[:, 4].set(7), dmask))
    np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-6)
    assert float(jnp.max(jnp.abs(out[:, 4:] - base[:, 4:]))) > 1e-3
    # changing padded encoder tokens changes nothing
    out = _logits(V11, v11_params, (jnp.where(mask == 0, 5, ids), mask, dec, dmask))
    np.testing.assert_allclose(out, base, atol=1e-6)
