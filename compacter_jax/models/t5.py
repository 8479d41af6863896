"""Flax linen T5 encoder-decoder with PEFT insertion points (see `hooks.py`).

Numerics follow HF PyTorch `T5ForConditionalGeneration`: RMS layer norm (scale only, float32
statistics), no 1/sqrt(d_kv) attention scaling, relative position buckets computed once per
stack (bidirectional in the encoder, causal in the decoder) and shared by all blocks, ReLU or
gated-GELU (tanh approximation) feed-forward, dropout on embeddings, attention probabilities,
the feed-forward hidden layer, every sublayer output and the final stack output.

Parameter names mirror HF (see docs/DESIGN.md); kernels are [in, out].
Decoding with a KV cache: `decode(..., decode=True)` with a mutable "cache" collection
(first call creates the cache, later calls feed one token each; see generation.py).

Packed inputs (t5x/seqio style): several examples share one row. The optional keyword
arguments `encoder_segment_ids`, `decoder_segment_ids` ([B, L] int32; 0 = padding, examples
numbered 1, 2, ... within a row) and `encoder_positions`, `decoder_positions` ([B, L] int32,
0 at the start of each example) make every example see only itself: self-attention stays
within a segment (causal in the decoder), cross-attention goes from a decoder token only to
the encoder tokens of the same segment, and padding attends to nothing and is attended by
nothing (its rows stay finite). Given positions, relative position buckets come from them
(the bias is then per row, [B, H, T, S]); without, from the row index, which gives the same
distances inside contiguous segments. Build decoder inputs with
`shift_right(labels, segment_ids=decoder_segment_ids)`. Without these arguments the model
computes exactly what it computes unpacked. Packing is for teacher-forced training and
scoring: the KV-cache decode path refuses it, and so does prompt tuning (a soft prompt
cannot be prepended to every segment of a row cheaply): set packing off for those.
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


def _check_packing_shape(name: str, value, expected: tuple[int, ...]) -> None:
    """Packing inputs align token by token with their ids; say which one does not."""
    if value is not None and tuple(np.shape(value)) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(np.shape(value))}, expected {tuple(expected)} "
                         "(one int32 entry per token of the matching ids)")


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

    def _self_attention_bias(self, mask: Array, length: int, segment_ids: Array | None = None,
                             positions: Array | None = None) -> tuple[Array, Array | None]:
        """Position bias + masks [B|1, H, T, S] float32, and the decode step index (or None).

        segment_ids/positions: int [B, T] of packed rows (never with the KV cache): keys are
        restricted to the query's segment, and relative distances come from `positions`."""
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
        if segment_ids is not None:
            keep = jnp.logical_and(keep, segment_mask(segment_ids, segment_ids))
        bucket = functools.partial(relative_position_bucket, bidirectional=not self.is_decoder,
                                   num_buckets=cfg.relative_attention_num_buckets,
                                   max_distance=cfg.relative_attention_max_distance)
        if positions is None:  # one bias for every row
            buckets = bucket(k_pos[None, :] - q_pos[:, None])
            pos_bias = jnp.transpose(rel_emb(buckets), (2, 0, 1))[None]  # [1, H, T, S]
        else:  # per-row distances of packed segments
            positions = jnp.asarray(positions, jnp.int32)
            buckets = bucket(positions[:, None, :] - positions[:, :, None])  # [B, T, S]
            pos_bias = jnp.transpose(rel_emb(buckets), (0, 3, 1, 2))  # [B, H, T, S]
        return pos_bias + jnp.where(keep, 0.0, _NEG).astype(jnp.float32), cache_index

    @nn.compact
    def __call__(self, embeds: Array, mask: Array | None, enc: Array | None = None,
                 enc_mask: Array | None = None, shared=None, segment_ids: Array | None = None,
                 positions: Array | None = None,
                 enc_segment_ids: Array | None = None, ladder: list[Array] | None = None,
                 return_taps: bool = False):
        """embeds: [B, T, D]; mask: [B, T] (1 = token) or None; enc/enc_mask: encoder output
        [B, S, D] / [B, S] (decoder only). Packed rows: segment_ids/positions [B, T] of these
        tokens, enc_segment_ids [B, S] of the encoder's (decoder only, with segment_ids).
        ladder: one array per block, mixed into the hidden state before it by the `ladder`
        hook. Returns (hidden [B, T', D], mask [B, T']) where T' includes soft-prompt tokens
        in the encoder; packed, the mask also drops padding (segment 0). With return_taps also
        the list of the n + 1 states [B, T', D] (the stack's input after dropout, then each
        block's output; unscanned layers only)."""
        cfg, hooks = self.config, self.hooks
        n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        b, t = embeds.shape[:2]
        mask = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
        if not self.is_decoder:
            prompt = hooks.soft_prompt(cfg.d_model, name="prompt")
            if prompt is not None:
                if segment_ids is not None or positions is not None:
                    raise ValueError(
                        "prompt tuning does not support packed inputs; set packing off (got "
                        "encoder_segment_ids/encoder_positions with a soft prompt)")
                embeds, mask = prompt(embeds, mask)
                mask = jnp.asarray(mask).astype(bool)
                t = embeds.shape[1]
        if segment_ids is not None:
            mask = jnp.logical_and(mask, jnp.asarray(segment_ids) != 0)
        self_bias, cache_index = self._self_attention_bias(mask, t, segment_ids, positions)
        cross_bias = None
        if self.is_decoder:
            enc_mask = jnp.ones(enc.shape[:2], bool) if enc_mask is None else enc_mask
            enc_keep = jnp.asarray(enc_mask).astype(bool)[:, None, None, :]
            if segment_ids is not None:  # [B, 1, T, S]: only the encoder tokens of one's example
                enc_keep = jnp.logical_and(enc_keep, segment_mask(segment_ids, enc_segment_ids))
            cross_bias = jnp.where(enc_keep, 0.0, _NEG).astype(jnp.float32)

        h = nn.Dropout(cfg.dropout_rate)(embeds, deterministic=self.deterministic)
        block_cls = T5Block
        if cfg.remat:
            block_cls = nn.remat(T5Block, prevent_cse=not cfg.scan_layers)
        args = (self_bias, enc, cross_bias, shared, cache_index)
        taps = [h]
        if cfg.scan_layers and (return_taps or ladder is not None):
            raise ValueError("per-block taps and ladder inputs need unscanned layers "
                             "(scan_layers=False)")
        if ladder is not None and len(ladder) != n:
            raise ValueError(f"ladder has {len(ladder)} entries, the stack has {n} blocks")
        if cfg.scan_layers:  # hooks.uniform_over_layers() is checked by the root model
            scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=n)
            h, _ = scanned(cfg, hooks, self.is_decoder, None, self.decode, self.deterministic,
                           name="blocks")(h, *args)
        else:
            stack = "decoder" if self.is_decoder else "encoder"
            for i in range(n):
                if ladder is not None:
                    mix = hooks.ladder(Site(stack, i, "block", n), name=f"ladder_{i}")
                    h = mix(h, ladder[i]) if mix is not None else h
                h, _ = block_cls(cfg, hooks, self.is_decoder, i, self.decode, self.deterministic,
                                 name=f"block_{i}")(h, *args)
                taps.append(h)
        h = T5LayerNorm(cfg, name="final_layer_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=self.deterministic)
        return (h, mask, taps) if return_taps else (h, mask)


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder LM; `hooks` insert PEFT modules (default: none).

    `__call__` -> logits [B, T, vocab] float32. Integer inputs are int32 [B, len]; masks 1 for
    real tokens. Methods `encode` and `decode` run the halves (use with `apply(method=...)`).
    Packed rows: the keyword-only `encoder_segment_ids`, `encoder_positions` [B, S] and
    `decoder_segment_ids`, `decoder_positions` [B, T] (see the module docstring); segment ids
    come in pairs (encoder and decoder) wherever the decoder runs.
    """

    config: T5Config
    hooks: T5Hooks = NO_HOOKS

    def __call__(self, input_ids: Array, attention_mask: Array, decoder_input_ids: Array,
                 decoder_attention_mask: Array | None = None, deterministic: bool = True, *,
                 encoder_segment_ids: Array | None = None,
                 encoder_positions: Array | None = None,
                 decoder_segment_ids: Array | None = None,
                 decoder_positions: Array | None = None) -> Array:
        return self._run("full", input_ids=input_ids, attention_mask=attention_mask,
                         decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask,
                         deterministic=deterministic, encoder_segment_ids=encoder_segment_ids,
                         encoder_positions=encoder_positions,
                         decoder_segment_ids=decoder_segment_ids,
                         decoder_positions=decoder_positions)

    def encode(self, input_ids: Array, attention_mask: Array, deterministic: bool = True,
               return_mask: bool = False, *, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None):
        """Encoder output [B, S', D] (compute dtype); with return_mask also the mask [B, S']
        (S' = S + soft-prompt length, which the decoder's cross-attention needs; packed, it is
        0 on padding)."""
        return self._run("encode", input_ids=input_ids, attention_mask=attention_mask,
                         deterministic=deterministic, return_mask=return_mask,
                         encoder_segment_ids=encoder_segment_ids,
                         encoder_positions=encoder_positions)

    def decode(self, decoder_input_ids: Array, encoder_hidden: Array, encoder_mask: Array,
               decoder_attention_mask: Array | None = None, deterministic: bool = True,
               decode: bool = False, *, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
        """Logits [B, T, vocab] float32 given the encoder output. decode=True uses/creates the
        KV cache (mutable "cache" collection): the first call (any T) creates it with length T,
        each later call takes one token [B, 1]. Packed rows (decode=False only) need
        `encoder_segment_ids` [B, S] with `decoder_segment_ids` [B, T]."""
        return self._run("decode", decoder_input_ids=decoder_input_ids,
                         decoder_attention_mask=decoder_attention_mask,
                         encoder_hidden=encoder_hidden, encoder_mask=encoder_mask,
                         deterministic=deterministic, decode=decode,
                         encoder_segment_ids=encoder_segment_ids,
                         decoder_segment_ids=decoder_segment_ids,
                         decoder_positions=decoder_positions)

    @nn.compact
    def _run(self, mode: str, input_ids=None, attention_mask=None, decoder_input_ids=None,
             decoder_attention_mask=None, encoder_hidden=None, encoder_mask=None,
             deterministic: bool = True, decode: bool = False, return_mask: bool = False,
             encoder_segment_ids=None, encoder_positions=None, decoder_segment_ids=None,
             decoder_positions=None):
        cfg, hooks = self.config, self.hooks
        if cfg.scan_layers and not hooks.uniform_over_layers():
            raise ValueError(f"scan_layers=True but {type(hooks).__name__}.uniform_over_layers() "
                             "is False: these hooks differ per layer. Use scan_layers=False.")
        _check_packing_args(mode, decode, input_ids, encoder_hidden, decoder_input_ids,
                            encoder_segment_ids, encoder_positions, decoder_segment_ids,
                            decoder_positions)
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=_normal(1.0),
                         dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name="shared")
        root = hooks.root_module(name="peft_root")
        shared = root() if root is not None else None

        side_encoder = hooks.side_network(cfg, False, name="side_encoder")
        side_decoder = hooks.side_network(cfg, True, name="side_decoder")
        if mode in ("full", "encode"):
            encoder = T5Stack(cfg, hooks, is_decoder=False, deterministic=deterministic,
                              name="encoder")
            out = encoder(embed(input_ids), attention_mask, shared=shared,
                          segment_ids=encoder_segment_ids, positions=encoder_positions,
                          return_taps=side_encoder is not None)
            encoder_hidden, encoder_mask = out[:2]
            side_hidden = None
            if side_encoder is not None:  # the side network reads every block's output
                side_hidden = side_encoder(out[2], attention_mask, deterministic,
                                           segment_ids=encoder_segment_ids,
                                           positions=encoder_positions)
            if mode == "encode":
                if side_hidden is not None:  # one array for decode(): [B, S, D + D_side]
                    encoder_hidden = jnp.concatenate(
                        [encoder_hidden, side_hidden.astype(encoder_hidden.dtype)], axis=-1)
                return (encoder_hidden, encoder_mask) if return_mask else encoder_hidden
        elif side_decoder is not None:  # decode(): split what encode() concatenated
            encoder_hidden, side_hidden = (encoder_hidden[..., :cfg.d_model],
                                           encoder_hidden[..., cfg.d_model:])
        decoder = T5Stack(cfg, hooks, is_decoder=True, decode=decode,
                          deterministic=deterministic, name="decoder")
        out = decoder(embed(decoder_input_ids), decoder_attention_mask, encoder_hidden,
                      encoder_mask, shared, segment_ids=decoder_segment_ids,
                      positions=decoder_positions, enc_segment_ids=encoder_segment_ids,
                      return_taps=side_decoder is not None)
        h = out[0]
        if side_decoder is not None:  # the lm_head reads the side network's output
            h = side_decoder(out[2], decoder_attention_mask, side_hidden, encoder_mask,
                             deterministic, decode, segment_ids=decoder_segment_ids,
                             positions=decoder_positions, enc_segment_ids=encoder_segment_ids)
            h = h.astype(out[0].dtype)
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


def _check_packing_args(mode: str, decode: bool, input_ids, encoder_hidden, decoder_input_ids,
                        encoder_segment_ids, encoder_positions, decoder_segment_ids,
                        decoder_positions) -> None:
    """Clear errors for packing inputs that cannot work (shapes, missing partner, KV cache)."""
    if mode in ("full", "encode"):
        shape = np.shape(input_ids)
        _check_packing_shape("encoder_segment_ids", encoder_segment_ids, shape)
        _check_packing_shape("encoder_positions", encoder_positions, shape)
    elif encoder_segment_ids is not None:
        got, want = tuple(np.shape(encoder_segment_ids)), tuple(np.shape(encoder_hidden)[:2])
        if got != want:
            raise ValueError(f"encoder_segment_ids has shape {got} but the encoder output has "
                             f"{want} (batch, tokens) (prompt tuning does not support packed "
                             "inputs; set packing off)")
    if mode == "encode":
        return
    shape = np.shape(decoder_input_ids)
    _check_packing_shape("decoder_segment_ids", decoder_segment_ids, shape)
    _check_packing_shape("decoder_positions", decoder_positions, shape)
    if (encoder_segment_ids is None) != (decoder_segment_ids is None):
        given = "encoder" if decoder_segment_ids is None else "decoder"
        raise ValueError(f"only {given}_segment_ids given: cross-attention of packed rows needs "
                         "both encoder_segment_ids and decoder_segment_ids (or neither)")
    if decode and (decoder_segment_ids is not None or decoder_positions is not None):
        raise ValueError("decode=True (KV cache) does not support packed inputs: generate from "
                         "unpacked rows (no decoder_segment_ids/decoder_positions)")


def shift_right(labels, decoder_start_token_id: int = 0, segment_ids=None):
    """Teacher-forcing decoder inputs: each token's input is the previous label.

    Unpacked: [start, labels[:, :-1]]. Packed (`segment_ids` given): the shift happens within
    each segment, so every segment's first input is the start token, and padding (segment 0)
    stays 0 (as seqio's `make_autoregressive_inputs`).

    Args:
      labels: int [B, T], numpy or jax.
      decoder_start_token_id: the first decoder input of each example (T5: 0 = pad).
      segment_ids: optional int [B, T] of packed rows (0 = padding).
    Returns:
      [B, T] of the kind given: a jax array (int32) when labels (or segment_ids, e.g. traced
      under jit) are jax arrays, else a numpy array (the labels' integer dtype kept).
    """
    xp = jnp if isinstance(labels, jax.Array) or isinstance(segment_ids, jax.Array) else np
    labels = jnp.asarray(labels, jnp.int32) if xp is jnp else np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"shift_right: labels must be [batch, len], got shape {labels.shape}")
    start = xp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = xp.concatenate([start, labels[:, :-1]], axis=1)
    if segment_ids is None:
        return shifted
    segment_ids = xp.asarray(segment_ids)
    if segment_ids.shape != labels.shape:
        raise ValueError(f"shift_right: segment_ids has shape {segment_ids.shape}, labels "
                         f"{labels.shape}; give one segment id per label")
    # A token continues its segment when its left neighbour has the same (nonzero) id.
    continues = xp.concatenate([xp.zeros((labels.shape[0], 1), bool),
                                segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1)
    shifted = xp.where(continues, shifted, xp.asarray(decoder_start_token_id, labels.dtype))
    return xp.where(segment_ids == 0, xp.zeros((), labels.dtype), shifted)
