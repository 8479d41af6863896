"""T5 attention: relative position buckets, packing masks, attention and its pre-norm sublayer.

As HF PyTorch T5: no 1/sqrt(d_kv) score scaling, scores and softmax in float32, an additive
`bias` carrying both the relative position bias and the masks (the most negative float32 for
a masked key, so a fully masked row stays finite). The position bias itself is computed once
per stack (`t5_stack.T5Stack`) and shared by its blocks.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models.config import T5Config
from compacter_jax.models.hooks import Site, T5Hooks
from compacter_jax.models.t5_layers import adapter_dropout_residual, layer_norm, project

Array = jax.Array
# Additive mask value, as HF: the most negative float32 (a fully masked row stays finite).
NEG = float(np.finfo(np.float32).min)


# --- relative position buckets -------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _magnitude_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """Bucket of each distance 0..max_distance (one direction), as HF/Mesh-TF compute it.

    Distances >= max_distance all map to num_buckets - 1, so a table of max_distance + 1
    entries is exact; computing it once on the host in float32 (as torch does) keeps the
    log-spaced bucket edges identical on every backend.
    """
    n = np.arange(max_distance + 1)
    max_exact = num_buckets // 2
    ratio = np.maximum(n, 1).astype(np.float32) / np.float32(max_exact)
    large = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (large * np.float32(num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return np.where(n < max_exact, n, large).astype(np.int32)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """int32 bucket ids for relative positions (key_pos - query_pos), same shape as input."""
    rel = jnp.asarray(relative_position, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        offset = (rel > 0).astype(jnp.int32) * num_buckets
        dist = jnp.abs(rel)
    else:
        offset = 0
        dist = -jnp.minimum(rel, 0)
    table = jnp.asarray(_magnitude_buckets(num_buckets, max_distance))
    return offset + table[jnp.minimum(dist, max_distance)]


# --- packing masks -------------------------------------------------------------------------
def segment_mask(query_segments: Array, key_segments: Array) -> Array:
    """Which key each query may attend to in packed rows: same segment, key not padding.

    Args:
      query_segments: int [B, T] segment ids of the queries (0 = padding).
      key_segments: int [B, S] segment ids of the keys (0 = padding).
    Returns:
      bool [B, 1, T, S] (broadcasts over heads). A padding query (segment 0) matches no key,
      since no key of segment 0 is ever kept.
    """
    q = jnp.asarray(query_segments)[:, None, :, None]
    k = jnp.asarray(key_segments)[:, None, None, :]
    return jnp.logical_and(q == k, k != 0)


def mask_bias(keep: Array) -> Array:
    """float32 additive bias of a boolean keep-mask: 0 where kept, `NEG` where masked."""
    return jnp.where(keep, 0.0, NEG).astype(jnp.float32)


# --- the attention module ------------------------------------------------------------------
class T5Attention(nn.Module):
    """Multi-head attention without score scaling; `bias` carries position bias and masks.

    With `decode=True` it keeps a KV cache in the "cache" collection: self-attention writes
    one position per call (`cache_index`) into `cached_key`/`cached_value`; cross-attention
    projects the encoder keys/values once (`cross_key`/`cross_value`) and reuses them.
    """

    config: T5Config
    hooks: T5Hooks
    site: Site
    is_cross: bool = False
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, kv: Array | None, bias: Array, shared,
                 cache_index: Array | None = None) -> Array:
        """x: [B, T, D] normed queries; kv: [B, S, D] (cross) or None (self);
        bias: float32 additive, broadcastable to [B, H, T, S]. Returns [B, T, D]."""
        cfg, hooks, site = self.config, self.hooks, self.site
        h, dk, d = cfg.num_heads, cfg.d_kv, cfg.d_model
        inner = h * dk
        proj = functools.partial(project, cfg=cfg, hooks=hooks, site=site, shared=shared)
        b, t = x.shape[:2]
        q = proj(x, "q", inner, (d * dk) ** -0.5).reshape(b, t, h, dk)
        if self.is_cross:
            if self.decode and self.has_variable("cache", "cross_key"):
                # Encoder keys/values were projected once when the cache was created.
                k = self.get_variable("cache", "cross_key")
                v = self.get_variable("cache", "cross_value")
            else:
                s = kv.shape[1]
                k = proj(kv, "k", inner, d ** -0.5).reshape(b, s, h, dk)
                v = proj(kv, "v", inner, d ** -0.5).reshape(b, s, h, dk)
                if self.decode:
                    self.variable("cache", "cross_key", lambda: k)
                    self.variable("cache", "cross_value", lambda: v)
        else:
            k = proj(x, "k", inner, d ** -0.5).reshape(b, t, h, dk)
            v = proj(x, "v", inner, d ** -0.5).reshape(b, t, h, dk)
            if self.decode:
                initialized = self.has_variable("cache", "cached_key")
                ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
                cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
                if initialized:  # one step: write this position, attend over the whole cache
                    start = (0, cache_index, 0, 0)
                    k = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), start)
                    v = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), start)
                    ck.value, cv.value = k, v
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias, axis=-1)
        probs = nn.Dropout(cfg.dropout_rate)(probs, deterministic=self.deterministic)
        out = jnp.einsum("bhts,bshd->bthd", probs.astype(cfg.compute_dtype), v)
        return proj(out.reshape(b, t, inner), "o", d, inner ** -0.5)


class T5LayerAttention(nn.Module):
    """Pre-norm self-attention (`SelfAttention`) or cross-attention (`EncDecAttention`) sublayer."""

    config: T5Config
    hooks: T5Hooks
    site: Site
    is_cross: bool = False
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, h: Array, kv: Array | None, bias: Array, shared,
                 cache_index: Array | None = None) -> Array:
        y = layer_norm(h, self.config, self.hooks, self.site, shared)
        y = T5Attention(self.config, self.hooks, self.site, is_cross=self.is_cross,
                        decode=self.decode, deterministic=self.deterministic,
                        name="EncDecAttention" if self.is_cross else "SelfAttention")(
            y, kv, bias, shared, cache_index)
        return adapter_dropout_residual(h, y, self.config, self.hooks, self.site, shared,
                                        self.deterministic)
