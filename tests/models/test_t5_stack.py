"""`T5Stack`'s per-block taps (`return_taps`): a scanned stack returns the same states as the
unscanned one, and stacks the block outputs only when they are asked for."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from t5_reference import fast_jit, padded_batch

from compacter_jax.models import NO_HOOKS, T5Config, stack_blocks
from compacter_jax.models.t5_stack import Encoded, T5Stack

# 3 encoder / 2 decoder blocks, gated FF: d_model 32, d_ff 48.
CFG = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
# Two float32 programs of the same arithmetic (a loop vs a scan) differ by reordered sums over
# at most d_ff terms: a few eps32 * sqrt(d_ff) of the values' scale.
CLOSE32 = 4 * float(np.finfo(np.float32).eps) * np.sqrt(CFG.d_ff)


def _inputs(is_decoder: bool):
    """(embeds [3, T, 32], mask [3, T], Encoded or None), random, with padding."""
    ids, mask, dec, dmask = padded_batch(CFG.vocab_size)
    rs = np.random.RandomState(1)
    if not is_decoder:
        return jnp.asarray(rs.randn(*ids.shape, CFG.d_model), jnp.float32), mask, None
    enc = Encoded(jnp.asarray(rs.randn(*ids.shape, CFG.d_model), jnp.float32), mask)
    return jnp.asarray(rs.randn(*dec.shape, CFG.d_model), jnp.float32), dmask, enc


def _params(is_decoder, embeds, mask, encoded):
    """Random unscanned stack params (numpy draws into the init's shapes: no compile)."""
    shapes = jax.eval_shape(lambda: T5Stack(CFG, NO_HOOKS, is_decoder).init(
        jax.random.PRNGKey(0), embeds, mask, encoded)["params"])
    rs = np.random.RandomState(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(1 + 0.1 * rs.randn(*s.shape) if len(s.shape) == 1 else
                              rs.randn(*s.shape) / np.sqrt(s.shape[0]), s.dtype), shapes)


@fast_jit(static_argnames=("cfg", "is_decoder", "return_taps"))
def _run(cfg, is_decoder, return_taps, params, embeds, mask, encoded):
    return T5Stack(cfg, NO_HOOKS, is_decoder).apply({"params": params}, embeds, mask, encoded,
                                                    return_taps=return_taps)


def _scan_outputs(jaxpr):
    """Shapes of the outputs of every `scan` in `jaxpr` (sub-jaxprs included)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _scan_outputs(sub)
    return out


# The decoder (self- and cross-attention) by default; the LST tests run scanned encoders too.
@pytest.mark.parametrize("is_decoder", [pytest.param(False, id="encoder", marks=pytest.mark.long),
                                        pytest.param(True, id="decoder")])
def test_scanned_taps_equal_unscanned_taps(is_decoder):
    embeds, mask, encoded = _inputs(is_decoder)
    n = CFG.num_decoder_layers if is_decoder else CFG.num_layers
    params = _params(is_decoder, embeds, mask, encoded)
    stacked = stack_blocks({"encoder": params})["encoder"]
    assert stacked["blocks"]["layer_0"]["SelfAttention"]["q"]["kernel"].shape == (n, 32, 32)
    scanned = CFG.replace(scan_layers=True)
    h0, m0, want = _run(CFG, is_decoder, True, params, embeds, mask, encoded)
    h1, m1, got = _run(scanned, is_decoder, True, stacked, embeds, mask, encoded)
    assert len(want) == len(got) == n + 1
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(embeds))  # [h0] first
    for i, (a, b) in enumerate(zip(got, want)):
        scale = float(jnp.max(jnp.abs(b)))
        assert a.shape == b.shape == embeds.shape and scale > 0.1
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=CLOSE32 * scale,
                                   err_msg=f"tap {i}")
    # The taps are the states the blocks hand on: consecutive taps differ.
    assert all(float(jnp.max(jnp.abs(got[i + 1] - got[i]))) > 1e-2 for i in range(n))
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), rtol=0,
                               atol=CLOSE32 * float(jnp.max(jnp.abs(h0))))
    np.testing.assert_array_equal(np.asarray(m1), np.asarray(m0))
    # Without taps the scan stacks no per-block state (the program taps did not change).
    per_block = (n, *embeds.shape)

    def scans(return_taps):
        return _scan_outputs(jax.make_jaxpr(
            lambda p: T5Stack(scanned, NO_HOOKS, is_decoder).apply(
                {"params": p}, embeds, mask, encoded, return_taps=return_taps))(stacked).jaxpr)
    assert per_block in scans(True)
    assert per_block not in scans(False) and scans(False)


def test_ladder_inputs_still_need_unscanned_layers():
    embeds, mask, _ = _inputs(False)
    stack = T5Stack(CFG.replace(scan_layers=True), NO_HOOKS, False)
    with pytest.raises(ValueError, match="ladder inputs need unscanned layers"):
        jax.eval_shape(lambda: stack.init(jax.random.PRNGKey(0), embeds, mask,
                                          ladder=[embeds] * CFG.num_layers))
