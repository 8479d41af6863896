"""A T5 block and the encoder/decoder stack over embedded tokens.

The stack computes the relative position bias and the masks once and shares them with its
blocks (run in a Python loop, or under `nn.scan` with `T5Config.scan_layers`). Two small
groups travel with it: `Packing` (where the examples of packed rows lie, for this stack's
tokens) and `Encoded` (what the decoder's cross-attention reads). Run-mode flags
(`deterministic`, `decode`) are call arguments, so one stack built in the root model's
`setup` serves training, evaluation and cached decoding.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from compacter_jax.models.config import T5Config
from compacter_jax.models.hooks import Site, T5Hooks
from compacter_jax.models.t5_attention import (T5LayerAttention, mask_bias,
                                               relative_position_bucket, segment_mask)
from compacter_jax.models.t5_layers import T5LayerFF, T5LayerNorm, normal

Array = jax.Array


class Packing(NamedTuple):
    """Packed rows (t5x/seqio style), for the tokens of one stack; both None: unpacked.

    Attributes:
      segment_ids: int32 [B, L]; 0 = padding, the examples of a row numbered 1, 2, ...
      positions: int32 [B, L]; 0 at the start of each example (None: the row index).
    """

    segment_ids: Array | None = None
    positions: Array | None = None


class Encoded(NamedTuple):
    """The encoder's side of cross-attention.

    Attributes:
      hidden: [B, S, D] encoder output (compute dtype).
      mask: [B, S], 1 (True) for keys to attend to; None: all.
      segment_ids: int32 [B, S] of packed rows (given with the decoder's), else None.
    """

    hidden: Array
    mask: Array | None = None
    segment_ids: Array | None = None


class T5Block(nn.Module):
    """One encoder (self-attn, FF) or decoder (self-attn, cross-attn, FF) block.

    Returns (h, None) so the same module works as an `nn.scan` body; (h, h) with `emit`
    (the scan then stacks every block's output: the per-block taps of a scanned stack).
    """

    config: T5Config
    hooks: T5Hooks
    is_decoder: bool
    layer: int | None
    decode: bool = False
    deterministic: bool = True
    emit: bool = False

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
        return h, (h if self.emit else None)


def cross_attention_bias(encoded: Encoded, decoder_segment_ids: Array | None) -> Array:
    """float32 [B, 1, 1|T, S] additive bias of the decoder's cross-attention: encoder padding
    masked and, packed, every decoder token restricted to its own example's encoder tokens."""
    enc_mask = (jnp.ones(encoded.hidden.shape[:2], bool) if encoded.mask is None
                else encoded.mask)
    keep = jnp.asarray(enc_mask).astype(bool)[:, None, None, :]
    if decoder_segment_ids is not None:  # [B, 1, T, S]
        keep = jnp.logical_and(keep, segment_mask(decoder_segment_ids, encoded.segment_ids))
    return mask_bias(keep)


class T5Stack(nn.Module):
    """Encoder or decoder stack over already-embedded tokens."""

    config: T5Config
    hooks: T5Hooks
    is_decoder: bool

    def _self_attention_bias(self, mask: Array, length: int, packing: Packing,
                             decode: bool) -> tuple[Array, Array | None]:
        """Position bias + masks [B|1, H, T, S] float32, and the decode step index (or None).

        Packed rows (never with the KV cache): keys are restricted to the query's segment, and
        relative distances come from `packing.positions` when given."""
        cfg = self.config
        segment_ids, positions = packing
        rel_emb = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                           embedding_init=normal(cfg.d_model ** -0.5), dtype=jnp.float32,
                           param_dtype=cfg.params_dtype, name="relative_attention_bias")
        cache_index = None
        q_pos = k_pos = jnp.arange(length, dtype=jnp.int32)
        if decode:
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
        return pos_bias + mask_bias(keep), cache_index

    @nn.compact
    def __call__(self, embeds: Array, mask: Array | None, encoded: Encoded | None = None, *,
                 packing: Packing = Packing(), shared=None, ladder: list[Array] | None = None,
                 return_taps: bool = False, deterministic: bool = True, decode: bool = False):
        """Runs the stack.

        Args:
          embeds: [B, T, D] embedded tokens.
          mask: [B, T], 1 for real tokens; None: all.
          encoded: the encoder's output, masks and segment ids (decoder only).
          packing: segment ids / positions [B, T] of these tokens (packed rows).
          shared: the pytree of the hooks' root module, passed to every hooked module.
          ladder: one array per block, mixed into the hidden state before it by the
            `ladder` hook (unscanned layers only).
          return_taps: also return the n + 1 states [B, T', D]: the stack's input after
            dropout, then each block's output (scanned: the scan's stacked outputs, sliced).
          deterministic: no dropout.
          decode: use / create the KV cache (mutable "cache" collection; unpacked only).
        Returns:
          (hidden [B, T', D], mask [B, T']) and, with return_taps, the taps. T' includes the
          soft-prompt tokens in the encoder; packed, the mask also drops padding (segment 0).
        """
        cfg, hooks = self.config, self.hooks
        n = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        b, t = embeds.shape[:2]
        mask = jnp.ones((b, t), bool) if mask is None else jnp.asarray(mask).astype(bool)
        if not self.is_decoder:
            prompt = hooks.soft_prompt(cfg.d_model, name="prompt")
            if prompt is not None:
                if packing.segment_ids is not None or packing.positions is not None:
                    raise ValueError(
                        "prompt tuning does not support packed inputs; set packing off (got "
                        "encoder_segment_ids/encoder_positions with a soft prompt)")
                embeds, mask = prompt(embeds, mask)
                mask = jnp.asarray(mask).astype(bool)
                t = embeds.shape[1]
        if packing.segment_ids is not None:
            mask = jnp.logical_and(mask, jnp.asarray(packing.segment_ids) != 0)
        self_bias, cache_index = self._self_attention_bias(mask, t, packing, decode)
        enc, cross_bias = None, None
        if self.is_decoder:
            if encoded is None:
                raise ValueError("the decoder stack needs the encoder output (encoded=Encoded("
                                 "hidden, mask, segment_ids))")
            enc, cross_bias = encoded.hidden, cross_attention_bias(encoded, packing.segment_ids)

        h = nn.Dropout(cfg.dropout_rate)(embeds, deterministic=deterministic)
        block_cls = T5Block
        if cfg.remat:
            block_cls = nn.remat(T5Block, prevent_cse=not cfg.scan_layers)
        args = (self_bias, enc, cross_bias, shared, cache_index)
        taps = [h]
        if cfg.scan_layers and ladder is not None:
            raise ValueError("ladder inputs need unscanned layers (scan_layers=False)")
        if ladder is not None and len(ladder) != n:
            raise ValueError(f"ladder has {len(ladder)} entries, the stack has {n} blocks")
        if cfg.scan_layers:  # hooks.uniform_over_layers() is checked by the root model
            scanned = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(args), length=n)
            # Only with taps does the scan stack the block outputs (else the same program).
            h, states = scanned(cfg, hooks, self.is_decoder, None, decode, deterministic,
                                emit=return_taps, name="blocks")(h, *args)
            if return_taps:
                taps.extend(states[i] for i in range(n))
        else:
            stack = "decoder" if self.is_decoder else "encoder"
            for i in range(n):
                if ladder is not None:
                    mix = hooks.ladder(Site(stack, i, "block", n), name=f"ladder_{i}")
                    h = mix(h, ladder[i]) if mix is not None else h
                h, _ = block_cls(cfg, hooks, self.is_decoder, i, decode, deterministic,
                                 name=f"block_{i}")(h, *args)
                taps.append(h)
        h = T5LayerNorm(cfg, name="final_layer_norm")(h)
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return (h, mask, taps) if return_taps else (h, mask)
