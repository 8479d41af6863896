"""Flax linen T5 encoder-decoder with PEFT insertion points (see `hooks.py`).

Numerics follow HF PyTorch `T5ForConditionalGeneration`: RMS layer norm (scale only, float32
statistics), no 1/sqrt(d_kv) attention scaling, relative position buckets computed once per
stack (bidirectional in the encoder, causal in the decoder) and shared by all blocks, ReLU or
gated-GELU (tanh approximation) feed-forward, dropout on embeddings, attention probabilities,
the feed-forward hidden layer, every sublayer output and the final stack output.

Parameter names mirror HF (see docs/DESIGN.md); kernels are [in, out].
Decoding with a KV cache: `decode(..., decode=True)` with a mutable "cache" collection
(first call creates the cache, later calls feed one token each; see generation.py).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models.config import T5Config
from compacter_jax.models.hooks import NO_HOOKS, Site, T5Hooks

Array = jax.Array
# Additive mask value, as HF: the most negative float32 (a fully masked row stays finite).
_NEG = float(np.finfo(np.float32).min)


def _normal(std: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=std)


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


# --- building blocks -----------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; statistics in float32. [..., d] -> [..., d] compute dtype."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), cfg.params_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)
        return (scale.astype(jnp.float32) * y).astype(cfg.compute_dtype)


def _project(x: Array, proj: str, out_features: int, std: float, cfg: T5Config, hooks: T5Hooks,
             site: Site, shared) -> Array:
    """x @ kernel (named `proj`) plus the hook's delta `{proj}_delta`, if any. Call in compact."""
    y = nn.Dense(out_features, use_bias=False, dtype=cfg.compute_dtype,
                 param_dtype=cfg.params_dtype, kernel_init=_normal(std), name=proj)(x)
    delta = hooks.projection_delta(site, proj, x.shape[-1], out_features, name=f"{proj}_delta")
    if delta is not None:
        y = y + delta(x, shared).astype(y.dtype)
    return y


def _layer_norm(h: Array, cfg: T5Config, hooks: T5Hooks, site: Site, shared) -> Array:
    """The sublayer's pre-norm `layer_norm` plus the hook's delta, if any. Call in compact."""
    y = T5LayerNorm(cfg, name="layer_norm")(h)
    delta = hooks.layer_norm_delta(site, cfg.d_model, name="layer_norm_delta")
    if delta is not None:
        y = y + delta(y, shared).astype(y.dtype)
    return y


def _adapter_dropout_residual(h: Array, y: Array, cfg: T5Config, hooks: T5Hooks, site: Site,
                              shared, deterministic: bool) -> Array:
    """h + Dropout(adapter(y)): the adapter sits on the sublayer output. Call in compact."""
    adapter = hooks.sublayer_adapter(site, cfg.d_model, name="adapter")
    if adapter is not None:
        y = adapter(y, shared).astype(y.dtype)
    return h + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class T5Attention(nn.Module):
    """Multi-head attention without score scaling; `bias` carries position bias and masks."""

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
        proj = functools.partial(_project, cfg=cfg, hooks=hooks, site=site, shared=shared)
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
        y = _layer_norm(h, self.config, self.hooks, self.site, shared)
        y = T5Attention(self.config, self.hooks, self.site, is_cross=self.is_cross,
                        decode=self.decode, deterministic=self.deterministic,
                        name="EncDecAttention" if self.is_cross else "SelfAttention")(
            y, kv, bias, shared, cache_index)
        return _adapter_dropout_residual(h, y, self.config, self.hooks, self.site, shared,
                                         self.deterministic)


class T5DenseReluDense(nn.Module):
    """wo(dropout(act(wi x))) or, gated, wo(dropout(gelu_tanh(wi_0 x) * wi_1 x))."""

    config: T5Config
    hooks: T5Hooks
    site: Site
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, shared) -> Array:
        cfg = self.config
        proj = functools.partial(_project, cfg=cfg, hooks=self.hooks, site=self.site, shared=shared)
        std_in = cfg.d_model ** -0.5
        if cfg.is_gated:
            y = (jax.nn.gelu(proj(x, "wi_0", cfg.d_ff, std_in), approximate=True)
                 * proj(x, "wi_1", cfg.d_ff, std_in))
        else:
            y = jax.nn.relu(proj(x, "wi", cfg.d_ff, std_in))
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
        return proj(y, "wo", cfg.d_model, cfg.d_ff ** -0.5)


class T5LayerFF(nn.Module):
    config: T5Config
    hooks: T5Hooks
    site: Site
    deterministic: bool = True

    @nn.compact
    def __call__(self, h: Array, shared) -> Array:
        y = _layer_norm(h, self.config, self.hooks, self.site, shared)
        y = T5DenseReluDense(self.config, self.hooks, self.site, self.deterministic,
                             name="DenseReluDense")(y, shared)
        return _adapter_dropout_residual(h, y, self.config, self.hooks, self.site, shared,
                                         self.deterministic)


class T5Block(nn.Module):
    """One encoder (self-attn, FF) or decoder (self-attn, cross-attn, FF) block.

    Returns (h, None) so the same module works as an `nn.scan` body.
    """

    config: T5Config
    hooks: T5Hooks
    is_decoder: bool
    layer: int | None
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(self, h: Array, self_bias: Array, enc: Array | None, cross_bias: Array | None,
                 shared, cache_index: Array | None):
        cfg, hooks = self.config, self.hooks
        stack = "decoder" if self.is_decoder else "encoder"
        n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        site = functools.partial(Site, stack, self.layer, num_layers=n)
        h = T5LayerAttention(cfg, hooks, site(sublayer="self_attention"), False, self.decode,
                             self.deterministic, name="layer_0")(h, None, self_bias, shared,
                                                                 cache_index)
        if self.is_decoder:
            h = T5LayerAttention(cfg, hooks, site(sublayer="cross_attention"), True, self.decode,
                                 self.deterministic, name="layer_1")(h, enc, cross_bias, shared)
        h = T5LayerFF(cfg, hooks, site(sublayer="feed_forward"), self.deterministic,
                      name="layer_2" if self.is_decoder else "layer_1")(h, shared)
        return h, None


class T5Stack(nn.Module):
    """Encoder or decoder stack over already-embedded tokens."""

    config: T5Config
    hooks: T5Hooks
    is_decoder: bool
    decode: bool = False
    deterministic: bool = True

    def _self_attention_bias(self, mask: Array, length: int) -> tuple[Array, Array | None]:
        """Position bias + masks [B|1, H, T, S] float32, and the decode step index (or None)."""
        cfg = self.config
        rel_emb = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                           embedding_init=_normal(cfg.d_model ** -0.5), dtype=jnp.float32,
                           param_dtype=cfg.params_dtype, name="relative_attention_bias")
        cache_index = None
        q_pos = k_pos = jnp.arange(length, dtype=jnp.int32)
        if self.decode:
            stepping = self.has_variable("cache", "cache_index")
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
            # The shape of key_positions remembers the cache length.
            keys = self.variable("cache", "key_positions",
                                 lambda: jnp.arange(length, dtype=jnp.int32))
            if stepping:
                if length != 1:
                    raise ValueError(f"decode steps take one token at a time, got {length}")
                cache_index = index.value
                index.value = cache_index + 1
                q_pos, k_pos = cache_index[None], keys.value
                mask = None  # generation has no decoder padding; future keys masked below
        keep = (k_pos[None, :] <= q_pos[:, None])[None, None] if self.is_decoder else True
        if mask is not None:
            keep = jnp.logical_and(keep, mask[:, None, None, :])
        buckets = relative_position_bucket(k_pos[None, :] - q_pos[:, None], not self.is_decoder,
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
        pos_bias = jnp.transpose(rel_emb(buckets), (2, 0, 1))[None]  # [1, H, T, S]
        return pos_bias + jnp.where(keep, 0.0, _NEG).astype(jnp.float32), cache_index

    @nn.compact
    def __call__(self, embeds: Array, mask: Array | None, enc: Array | None = None,
                 enc_mask: Array | None = None, shared=None) -> tuple[Array, Array]:
        """embeds: [B, T, D]; mask: [B, T] (1 = token) or None; enc/enc_mask: encoder output
        [B, S, D] / [B, S] (decoder only). Returns (hidden [B, T', D], mask [B, T']) where T'
        includes soft-prompt tokens in the encoder."""
        cfg, hooks = self.config, self.hooks
        n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        b, t = embeds.shape[:2]
        mask = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
        if not self.is_decoder:
            prompt = hooks.soft_prompt(cfg.d_model, name="prompt")
            if prompt is not None:
                embeds, mask = prompt(embeds, mask)
                mask = jnp.asarray(mask).astype(bool)
                t = embeds.shape[1]
        self_bias, cache_index = self._self_attention_bias(mask, t)
        cross_bias = None
        if self.is_decoder:
            enc_mask = jnp.ones(enc.shape[:2], bool) if enc_mask is None else enc_mask
            cross_bias = jnp.where(jnp.asarray(enc_mask).astype(bool)[:, None, None, :], 0.0,
                                   _NEG).astype(jnp.float32)

        h = nn.Dropout(cfg.dropout_rate)(embeds, deterministic=self.deterministic)
        block_cls = T5Block
        if cfg.remat:
            block_cls = nn.remat(T5Block, prevent_cse=not cfg.scan_layers)
        args = (self_bias, enc, cross_bias, shared, cache_index)
        if cfg.scan_layers:  # hooks.uniform_over_layers() is checked by the root model
            scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=n)
            h, _ = scanned(cfg, hooks, self.is_decoder, None, self.decode, self.deterministic,
                           name="blocks")(h, *args)
        else:
            for i in range(n):
                h, _ = block_cls(cfg, hooks, self.is_decoder, i, self.decode, self.deterministic,
                                 name=f"block_{i}")(h, *args)
        h = T5LayerNorm(cfg, name="final_layer_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return h, mask


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder LM; `hooks` insert PEFT modules (default: none).

    `__call__` -> logits [B, T, vocab] float32. Integer inputs are int32 [B, len]; masks 1 for
    real tokens. Methods `encode` and `decode` run the halves (use with `apply(method=...)`).
    """

    config: T5Config
    hooks: T5Hooks = NO_HOOKS

    def __call__(self, input_ids: Array, attention_mask: Array, decoder_input_ids: Array,
                 decoder_attention_mask: Array | None = None, deterministic: bool = True) -> Array:
        return self._run("full", input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask,
                         deterministic=deterministic)

    def encode(self, input_ids: Array, attention_mask: Array, deterministic: bool = True,
               return_mask: bool = False):
        """Encoder output [B, S', D] (compute dtype); with return_mask also the mask [B, S']
        (S' = S + soft-prompt length, which the decoder's cross-attention needs)."""
        return self._run("encode", input_ids=input_ids, attention_mask=attention_mask,
                         deterministic=deterministic, return_mask=return_mask)

    def decode(self, decoder_input_ids: Array, encoder_hidden: Array, encoder_mask: Array,
               decoder_attention_mask: Array | None = None, deterministic: bool = True,
               decode: bool = False) -> Array:
        """Logits [B, T, vocab] float32 given the encoder output. decode=True uses/creates the
        KV cache (mutable "cache" collection): the first call (any T) creates it with length T,
        each later call takes one token [B, 1]."""
        return self._run("decode", decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask,
                         encoder_hidden=encoder_hidden, encoder_mask=encoder_mask,
                         deterministic=deterministic, decode=decode)

    @nn.compact
    def _run(self, mode: str, input_ids=None, attention_mask=None, decoder_input_ids=None,
             decoder_attention_mask=None, encoder_hidden=None, encoder_mask=None,
             deterministic: bool = True, decode: bool = False, return_mask: bool = False):
        cfg, hooks = self.config, self.hooks
        if cfg.scan_layers and not hooks.uniform_over_layers():
            raise ValueError(f"scan_layers=True but {type(hooks).__name__}.uniform_over_layers() "
                             "is False: these hooks differ per layer. Use scan_layers=False.")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(1.0),
                         dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="shared")
        root = hooks.root_module(name="peft_root")
        shared = root() if root is not None else None

        if mode in ("full", "encode"):
            encoder = T5Stack(cfg, hooks, is_decoder=False, deterministic=deterministic,
                              name="encoder")
            encoder_hidden, encoder_mask = encoder(embed(input_ids), attention_mask,
                                                   shared=shared)
            if mode == "encode":
                return (encoder_hidden, encoder_mask) if return_mask else encoder_hidden
        decoder = T5Stack(cfg, hooks, is_decoder=True, decode=decode,
                          deterministic=deterministic, name="decoder")
        h, _ = decoder(embed(decoder_input_ids), decoder_attention_mask, encoder_hidden,
                       encoder_mask, shared)
        if cfg.scale_decoder_outputs:
            h = h * (cfg.d_model ** -0.5)
        if cfg.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.params_dtype, kernel_init=_normal(1.0),
                              name="lm_head")(h)
        site = Site("decoder", None, "lm_head", cfg.num_decoder_layers)
        delta = hooks.projection_delta(site, "lm_head", cfg.d_model, cfg.vocab_size,
                                       name="lm_head_delta")
        if delta is not None:
            logits = logits + delta(h, shared).astype(logits.dtype)
        return logits.astype(jnp.float32)


def shift_right(labels: Array, decoder_start_token_id: int = 0) -> Array:
    """Decoder inputs from labels: [start, labels[:-1]] (int32 [B, T])."""
    labels = jnp.asarray(labels, jnp.int32)
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, jnp.int32)
    return jnp.concatenate([start, labels[:, :-1]], axis=1)
