"""Every T5Hooks insertion point is called, at the right place, with `shared` threaded through.

Each test hook has an exact equivalent in the plain backbone, which is the reference:
  * adapter y -> (1 + a*g) * y on a sublayer output  ==  scaling that sublayer's output kernel
  * delta x -> g * (x @ D) beside a projection       ==  kernel + g * D
  * soft prompt = embeddings of token ids            ==  those ids prepended to the input
where g is the root module's parameter (`shared`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from t5_reference import apply_logits, padded_batch, random_params

from compacter_jax.models import (T5Config, T5ForConditionalGeneration, T5Hooks,
                                  greedy_generate, init_hook_params, init_params,
                                  stack_blocks)

CFG = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               scale_decoder_outputs=False)


class Root(nn.Module):
    @nn.compact
    def __call__(self):
        return {"g": self.param("g", nn.initializers.ones, ())}


class ScaleAdapter(nn.Module):
    @nn.compact
    def __call__(self, h, shared):
        a = self.param("a", nn.initializers.zeros, ())
        return h * (1.0 + a * shared["g"])


class DenseDelta(nn.Module):
    features_in: int
    features_out: int

    @nn.compact
    def __call__(self, x, shared):
        d = self.param("D", nn.initializers.zeros, (self.features_in, self.features_out))
        return shared["g"] * (x @ d)


class Prompt(nn.Module):
    length: int
    d_model: int

    @nn.compact
    def __call__(self, embeds, mask):
        p = self.param("P", nn.initializers.normal(1.0), (self.length, self.d_model))
        p = jnp.broadcast_to(p.astype(embeds.dtype), (embeds.shape[0],) + p.shape)
        ones = jnp.ones((mask.shape[0], self.length), mask.dtype)
        return jnp.concatenate([p, embeds], 1), jnp.concatenate([ones, mask], 1)


@dataclasses.dataclass(frozen=True)
class ProbeHooks(T5Hooks):
    """Adapters on self-attention and feed-forward (not cross-attention), deltas everywhere."""

    adapters: bool = True
    deltas: tuple[str, ...] = ()
    prompt: int = 0
    only_layer: int | None = None  # adapters only in this layer (non-uniform)

    def root_module(self, name="peft_root"):
        return Root(name=name)

    def sublayer_adapter(self, site, d_model, name="adapter"):
        if not self.adapters or site.sublayer == "cross_attention":
            return None
        if self.only_layer is not None and site.layer != self.only_layer:
            return None
        return ScaleAdapter(name=name)

    def projection_delta(self, site, projection, in_features, out_features, name):
        if projection in self.deltas:
            return DenseDelta(in_features, out_features, name=name)
        return None

    def soft_prompt(self, d_model, name="prompt"):
        return Prompt(self.prompt, d_model, name=name) if self.prompt else None

    def uniform_over_layers(self):
        return self.only_layer is None


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _set(params, updates: dict):
    flat = _flat(params)
    for k, v in updates.items():
        assert k in flat, k
        flat[k] = v
    return traverse_util.unflatten_dict(flat, sep="/")


@pytest.fixture(scope="module")
def backbone():
    return random_params(T5ForConditionalGeneration(CFG))


def _batch():
    return tuple(jnp.asarray(a) for a in padded_batch(64))


def _with_hooks(backbone, hooks, cfg=CFG, extra=None):
    """Backbone params + the hook params initialised by the hooked model (+ overrides)."""
    model = T5ForConditionalGeneration(cfg, hooks)
    full = _flat(init_hook_params(model, jax.random.PRNGKey(1)))
    assert not set(full) & set(_flat(backbone)), "hook params must not be backbone params"
    full.update(_flat(stack_blocks(backbone) if cfg.scan_layers else backbone))
    full.update(extra or {})
    return model, traverse_util.unflatten_dict(full, sep="/")


def test_adapters_sit_on_sublayer_outputs_and_use_shared(backbone):
    hooks = ProbeHooks()
    model, params = _with_hooks(backbone, hooks)
    flat = _flat(params)
    adapters = sorted(k for k in flat if "/adapter/" in k)
    assert adapters == sorted(
        [f"encoder/block_{i}/layer_{j}/adapter/a" for i in range(2) for j in (0, 1)]
        + [f"decoder/block_{i}/layer_{j}/adapter/a" for i in range(2) for j in (0, 2)])
    assert flat["peft_root/g"].shape == ()
    batch = _batch()
    # identity at init
    np.testing.assert_allclose(apply_logits(model, params, *batch),
                               apply_logits(T5ForConditionalGeneration(CFG), backbone, *batch),
                               atol=1e-5)
    a, g = 0.3, 2.0  # adapter scales its sublayer output by 1 + a*g = 1.6
    hooked = _set(params, {k: jnp.float32(a) for k in adapters} | {"peft_root/g": jnp.float32(g)})
    out_kernels = {k.replace("adapter/a", "SelfAttention/o/kernel") if "layer_0" in k else
                   k.replace("adapter/a", "DenseReluDense/wo/kernel") for k in adapters}
    ref_params = _set(backbone, {k: _flat(backbone)[k] * (1 + a * g) for k in out_kernels})
    np.testing.assert_allclose(apply_logits(model, hooked, *batch),
                               apply_logits(T5ForConditionalGeneration(CFG), ref_params, *batch),
                               atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_projection_deltas_add_to_every_projection(backbone, scan):
    projs = ("q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head")
    cfg = CFG.replace(scan_layers=scan)
    model, params = _with_hooks(backbone, ProbeHooks(adapters=False, deltas=projs), cfg)
    deltas = {k: v for k, v in _flat(params).items() if "_delta/" in k}
    per_layer = 4 + 3 + 4 * 2 + 3  # enc: qkvo + ff; dec: 2x qkvo + ff
    assert len(deltas) == (per_layer if scan else 2 * per_layer) + 1
    assert "lm_head_delta/D" in deltas
    prefix = "decoder/blocks" if scan else "decoder/block_1"
    assert f"{prefix}/layer_1/EncDecAttention/v_delta/D" in deltas
    g = 0.5
    rng = np.random.RandomState(0)
    upd = {k: jnp.asarray(rng.normal(0, 0.1, v.shape), jnp.float32) for k, v in deltas.items()}
    hooked = _set(params, upd | {"peft_root/g": jnp.float32(g)})
    ref = _flat(stack_blocks(backbone) if scan else backbone)
    for k, d in upd.items():
        kernel = k.replace("lm_head_delta/D", "lm_head/kernel").replace("_delta/D", "/kernel")
        ref[kernel] = ref[kernel] + g * d
    batch = _batch()
    want = apply_logits(T5ForConditionalGeneration(cfg),
                        traverse_util.unflatten_dict(ref, sep="/"), *batch)
    np.testing.assert_allclose(apply_logits(model, hooked, *batch), want, atol=1e-4)


def test_soft_prompt_extends_encoder_sequence_and_mask(backbone):
    n = 3
    model, params = _with_hooks(backbone, ProbeHooks(adapters=False, prompt=n))
    prompt_ids = jnp.array([5, 9, 17], jnp.int32)
    params = _set(params, {"encoder/prompt/P": backbone["shared"]["embedding"][prompt_ids]})
    ids, mask, dec, dmask = _batch()
    b = ids.shape[0]
    ids2 = jnp.concatenate([jnp.broadcast_to(prompt_ids, (b, n)), ids], 1)
    mask2 = jnp.concatenate([jnp.ones((b, n), mask.dtype), mask], 1)
    plain = T5ForConditionalGeneration(CFG)
    enc = jax.eval_shape(lambda: model.apply({"params": params}, ids, mask, method=model.encode))
    assert enc.shape == (b, ids.shape[1] + n, CFG.d_model)
    np.testing.assert_allclose(apply_logits(model, params, ids, mask, dec, dmask),
                               apply_logits(plain, backbone, ids2, mask2, dec, dmask),
                               atol=1e-4)
    # generation uses the extended mask for cross-attention
    np.testing.assert_array_equal(greedy_generate(model, params, ids, mask, 5),
                                  greedy_generate(plain, backbone, ids2, mask2, 5))


def test_layer_dependent_hooks_refuse_scan(backbone):
    hooks = ProbeHooks(only_layer=1)
    model, params = _with_hooks(backbone, hooks)
    assert sorted(k for k in _flat(params) if "adapter" in k) == [
        "decoder/block_1/layer_0/adapter/a", "decoder/block_1/layer_2/adapter/a",
        "encoder/block_1/layer_0/adapter/a", "encoder/block_1/layer_1/adapter/a"]
    with pytest.raises(ValueError, match="uniform_over_layers"):
        init_params(T5ForConditionalGeneration(CFG.replace(scan_layers=True), hooks),
                    jax.random.PRNGKey(0))
