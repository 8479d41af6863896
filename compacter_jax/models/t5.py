"""Flax linen T5 encoder-decoder with PEFT insertion points (see `hooks.py`).

Numerics follow HF PyTorch `T5ForConditionalGeneration`: RMS layer norm (scale only, float32
statistics), no 1/sqrt(d_kv) attention scaling, relative position buckets computed once per
stack (bidirectional in the encoder, causal in the decoder) and shared by all blocks, ReLU or
gated-GELU (tanh approximation) feed-forward, dropout on embeddings, attention probabilities,
the feed-forward hidden layer, every sublayer output and the final stack output.

Parameter names mirror HF (see docs/DESIGN.md); kernels are [in, out]. The model is shaped as
t5x's encoder-decoder: `setup()` builds the submodules (the shared embedding, the encoder and
decoder `T5Stack`s, the lm_head), `encode` and `decode` run the halves and `__call__` runs
`encode` then `decode`. The parts live in `t5_layers.py` (layer norm, hooked projections,
feed-forward), `t5_attention.py` (position buckets, masks, attention) and `t5_stack.py`
(blocks, stacks, and the `Packing` / `Encoded` argument groups).
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models.config import T5Config
from compacter_jax.models.hooks import NO_HOOKS, Site, T5Hooks
from compacter_jax.models.t5_attention import relative_position_bucket, segment_mask
from compacter_jax.models.t5_layers import normal
from compacter_jax.models.t5_stack import Encoded, Packing, T5Stack

__all__ = ["Encoded", "Packing", "T5ForConditionalGeneration", "T5Stack",
           "relative_position_bucket", "segment_mask", "shift_right"]

Array = jax.Array


class T5ForConditionalGeneration(nn.Module):
    """T5 encoder-decoder LM; `hooks` insert PEFT modules (default: none).

    `__call__` -> logits [B, T, vocab] float32: `encode` then `decode`. Integer inputs are
    int32 [B, len]; masks 1 for real tokens. `encode` and `decode` run the halves (use them
    with `apply(method=...)`; generation and rank classification encode once). Packed rows:
    the keyword-only `encoder_segment_ids`, `encoder_positions` [B, S] and
    `decoder_segment_ids`, `decoder_positions` [B, T] (see the module docstring); segment ids
    come in pairs (encoder and decoder) wherever the decoder runs.

    Submodules (built in `setup`, named as HF's parameters): `shared` (token embedding, also
    the tied output layer), `encoder`, `decoder` (`T5Stack`s), `lm_head` (untied only), and
    what the hooks return for the root: `peft_root`, `side_encoder`, `side_decoder`,
    `lm_head_delta` (None when they insert nothing).
    """

    config: T5Config
    hooks: T5Hooks = NO_HOOKS

    def setup(self) -> None:
        cfg, hooks = self.config, self.hooks
        if cfg.scan_layers and not hooks.uniform_over_layers():
            raise ValueError(f"scan_layers=True but {type(hooks).__name__}.uniform_over_layers() "
                             "is False: these hooks differ per layer. Use scan_layers=False.")
        self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=normal(1.0),
                               dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.peft_root = hooks.root_module(name="peft_root")
        self.encoder = T5Stack(cfg, hooks, is_decoder=False)
        self.decoder = T5Stack(cfg, hooks, is_decoder=True)
        self.side_encoder = hooks.side_network(cfg, False, name="side_encoder")
        self.side_decoder = hooks.side_network(cfg, True, name="side_decoder")
        self.lm_head = None if cfg.tie_word_embeddings else nn.Dense(
            cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype, kernel_init=normal(1.0))
        self.lm_head_delta = hooks.projection_delta(
            Site("decoder", None, "lm_head", cfg.num_decoder_layers), "lm_head", cfg.d_model,
            cfg.vocab_size, name="lm_head_delta")

    def __call__(self, input_ids: Array, attention_mask: Array, decoder_input_ids: Array,
                 decoder_attention_mask: Array | None = None, deterministic: bool = True, *,
                 encoder_segment_ids: Array | None = None,
                 encoder_positions: Array | None = None,
                 decoder_segment_ids: Array | None = None,
                 decoder_positions: Array | None = None) -> Array:
        # Every packing argument is checked before any work, whichever half it belongs to.
        _check_packing(input_ids, Packing(encoder_segment_ids, encoder_positions),
                       "encoder")
        _check_decoder_packing(decoder_input_ids, Packing(decoder_segment_ids,
                                                          decoder_positions),
                               encoder_segment_ids, decode=False)
        encoded, encoder_mask = self.encode(input_ids, attention_mask, deterministic,
                                            return_mask=True,
                                            encoder_segment_ids=encoder_segment_ids,
                                            encoder_positions=encoder_positions)
        return self.decode(decoder_input_ids, encoded, encoder_mask, decoder_attention_mask,
                           deterministic, encoder_segment_ids=encoder_segment_ids,
                           decoder_segment_ids=decoder_segment_ids,
                           decoder_positions=decoder_positions)

    def encode(self, input_ids: Array, attention_mask: Array, deterministic: bool = True,
               return_mask: bool = False, *, encoder_segment_ids: Array | None = None,
               encoder_positions: Array | None = None):
        """Encoder output [B, S', D] (compute dtype); with return_mask also the mask [B, S']
        (S' = S + soft-prompt length, which the decoder's cross-attention needs; packed, it is
        0 on padding). With a side network (`hooks.side_network`) the output is the backbone's
        and the side encoder's, concatenated on the feature axis: [B, S', D + D_side]."""
        packing = Packing(encoder_segment_ids, encoder_positions)
        _check_packing(input_ids, packing, "encoder")
        shared = self._shared()
        out = self.encoder(self.shared(input_ids), attention_mask, packing=packing,
                           shared=shared, return_taps=self.side_encoder is not None,
                           deterministic=deterministic)
        hidden, mask = out[:2]
        if self.side_encoder is not None:  # the side network reads every block's output
            side = self.side_encoder(out[2], attention_mask, deterministic,
                                     segment_ids=encoder_segment_ids,
                                     positions=encoder_positions)
            hidden = jnp.concatenate([hidden, side.astype(hidden.dtype)], axis=-1)
        return (hidden, mask) if return_mask else hidden

    def decode(self, decoder_input_ids: Array, encoder_hidden: Array, encoder_mask: Array,
               decoder_attention_mask: Array | None = None, deterministic: bool = True,
               decode: bool = False, *, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None,
               decoder_positions: Array | None = None) -> Array:
        """Logits [B, T, vocab] float32 given the encoder output (`encode`'s, side network's
        part included). decode=True uses/creates the KV cache (mutable "cache" collection):
        the first call (any T) creates it with length T, each later call takes one token
        [B, 1]. Packed rows (decode=False only) need `encoder_segment_ids` [B, S] with
        `decoder_segment_ids` [B, T]."""
        cfg = self.config
        _check_encoded(encoder_hidden, encoder_segment_ids)
        packing = Packing(decoder_segment_ids, decoder_positions)
        _check_decoder_packing(decoder_input_ids, packing, encoder_segment_ids, decode)
        side = None
        if self.side_decoder is not None:  # split what encode() concatenated
            encoder_hidden, side = (encoder_hidden[..., :cfg.d_model],
                                    encoder_hidden[..., cfg.d_model:])
        shared = self._shared()
        encoded = Encoded(encoder_hidden, encoder_mask, encoder_segment_ids)
        out = self.decoder(self.shared(decoder_input_ids), decoder_attention_mask, encoded,
                           packing=packing, shared=shared,
                           return_taps=self.side_decoder is not None,
                           deterministic=deterministic, decode=decode)
        h = out[0]
        if self.side_decoder is not None:  # the lm_head reads the side network's output
            h = self.side_decoder(out[2], decoder_attention_mask, side, encoder_mask,
                                  deterministic, decode, segment_ids=decoder_segment_ids,
                                  positions=decoder_positions,
                                  enc_segment_ids=encoder_segment_ids).astype(out[0].dtype)
        return self._logits(h, shared)

    def _shared(self):
        """The pytree the hooks' root module shares with every hooked module (or None)."""
        return self.peft_root() if self.peft_root is not None else None

    def _logits(self, h: Array, shared) -> Array:
        """float32 logits [B, T, vocab] of the final decoder state h [B, T, D]."""
        if self.config.scale_decoder_outputs:
            h = h * (self.config.d_model ** -0.5)
        logits = self.shared.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.lm_head_delta is not None:
            logits = logits + self.lm_head_delta(h, shared).astype(logits.dtype)
        return logits.astype(jnp.float32)


# --- argument checks (shapes are static: they run while tracing) ---------------------------
def _check_shape(name: str, value, expected: tuple[int, ...]) -> None:
    """Packing inputs align token by token with their ids; say which one does not."""
    if value is not None and tuple(np.shape(value)) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(np.shape(value))}, expected {tuple(expected)} "
                         "(one int32 entry per token of the matching ids)")


def _check_packing(ids, packing: Packing, stack: str) -> None:
    """The segment ids and positions of a stack's tokens have the ids' shape."""
    _check_shape(f"{stack}_segment_ids", packing.segment_ids, np.shape(ids))
    _check_shape(f"{stack}_positions", packing.positions, np.shape(ids))


def _check_encoded(encoder_hidden, encoder_segment_ids) -> None:
    """Encoder segment ids given to `decode` match the encoder output's tokens."""
    if encoder_segment_ids is None:
        return
    got, want = tuple(np.shape(encoder_segment_ids)), tuple(np.shape(encoder_hidden)[:2])
    if got != want:
        raise ValueError(f"encoder_segment_ids has shape {got} but the encoder output has "
                         f"{want} (batch, tokens) (prompt tuning does not support packed "
                         "inputs; set packing off)")


def _check_decoder_packing(decoder_input_ids, packing: Packing, encoder_segment_ids,
                           decode: bool) -> None:
    """Decoder packing inputs fit the ids, come with the encoder's, and not with the cache."""
    _check_packing(decoder_input_ids, packing, "decoder")
    if (encoder_segment_ids is None) != (packing.segment_ids is None):
        given = "encoder" if packing.segment_ids is None else "decoder"
        raise ValueError(f"only {given}_segment_ids given: cross-attention of packed rows needs "
                         "both encoder_segment_ids and decoder_segment_ids (or neither)")
    if decode and (packing.segment_ids is not None or packing.positions is not None):
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
