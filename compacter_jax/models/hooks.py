"""Insertion points of the Flax T5: how PEFT methods plug in without forking the model.

The T5 modules call a `T5Hooks` object at seven places. The default implementation inserts
nothing, so `T5ForConditionalGeneration(config)` is the plain backbone. PEFT methods
(`compacter_jax.peft`) subclass it.

Call sites, all inside linen `@nn.compact` methods or the root model's `setup` (so modules
returned by a hook are created as children of the calling module and named by the `name`
argument):

1. `root_module(name="peft_root")` — once, in the root model. Returns a module (or None)
   that is called with no arguments and returns a pytree `shared` (e.g. Compacter's one
   PHM rule). `shared` is passed to every adapter and projection delta below
   (`None` when there is no root module).
2. `sublayer_adapter(site, d_model, name="adapter")` — in every T5 sublayer (self-attention,
   cross-attention, feed-forward). Returns a module or None. Called as
   `adapter(h, shared) -> h'` on the sublayer output `h: [batch, len, d_model]`, *before*
   T5's dropout and residual:  out = x + Dropout(adapter(Sublayer(LayerNorm(x)))).
3. `projection_delta(site, projection, in_features, out_features, name)` — beside every
   linear projection of a sublayer (`projection` in {"q", "k", "v", "o", "wi", "wi_0",
   "wi_1", "wo"}). Returns a module or None. Called as `delta(x, shared) -> [..., out]`
   which is *added* to the frozen projection `x @ W` (LoRA's low-rank update, BitFit's bias).
   Also called with site.sublayer == "lm_head", projection "lm_head".
4. `layer_norm_delta(site, d_model, name="layer_norm_delta")` — beside the layer norm that
   starts every sublayer (not the two final norms). Returns a module or None. Called as
   `delta(y, shared) -> [..., d_model]`, *added* to the norm's output `y` (BitFit's
   layer-norm bias).
5. `soft_prompt(d_model, name="prompt")` — in the encoder, after the token embedding.
   Returns a module or None, called as `prompt(embeds, mask) -> (embeds', mask')` where
   embeds: [batch, len, d_model] and mask: [batch, len] (1 = keep). Used by prompt tuning.

6. `side_network(config, is_decoder, name)` — once per stack, in the root model (names
   "side_encoder", "side_decoder"). Returns a module or None. A network beside the backbone
   that reads the backbone's per-block hidden states ("taps": the stack's dropped-out input
   embedding, then the output of every block, each [batch, len, d_model]) and replaces the
   backbone's final decoder state as the input of the lm_head. Called as
   `side_encoder(taps, attention_mask, deterministic, segment_ids=, positions=) -> [B, S, d]`
   and `side_decoder(taps, decoder_attention_mask, side_encoder_out, encoder_mask,
   deterministic, decode, segment_ids=, positions=, enc_segment_ids=) -> [B, T, d_model]`.
   `encode` then returns the backbone's and the side encoder's outputs concatenated on the
   feature axis ([B, S, d_model + d]); `decode` splits them again, so decoding and scoring
   work unchanged. Scanned layers give the same taps (the scan stacks the block outputs
   only when taps are asked for).
7. `ladder(site, name)` — used only by a `T5Stack` called with `ladder=` (one array per
   block): before block i, `h = ladder_i(h, ladder[i])` (site.sublayer == "block"). A side
   network built from `T5Stack` mixes the backbone's taps in this way.

Packed inputs (segment ids / positions, see `t5.py`): adapters, projection deltas and root
parameters act token by token, so they work on packed rows unchanged. A soft prompt cannot be
prepended to every segment of a row cheaply: when `soft_prompt` returns a module and packing
inputs are given, the model raises ValueError ("prompt tuning does not support packed inputs;
set packing off").

When T5 layers are scanned (`T5Config.scan_layers`), `site.layer` is None and the hook must
place the same modules in every layer; hooks whose placement depends on the layer index
return False from `uniform_over_layers()` and the model refuses to scan with a clear error.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax.linen as nn

Stack = Literal["encoder", "decoder"]
Sublayer = Literal["self_attention", "cross_attention", "feed_forward", "lm_head", "block"]


@dataclasses.dataclass(frozen=True)
class Site:
    """Where a hook is being asked to insert something.

    Attributes:
      stack: "encoder" or "decoder" ("decoder" for the lm_head).
      layer: block index 0..num_layers-1, or None when layers are scanned (or for lm_head).
      sublayer: "self_attention", "cross_attention", "feed_forward" or "lm_head".
      num_layers: number of blocks in this stack.
    """

    stack: Stack
    layer: int | None
    sublayer: Sublayer
    num_layers: int


@dataclasses.dataclass(frozen=True)
class T5Hooks:
    """No-op hooks: the plain T5 backbone. Subclass (as a frozen dataclass) to add PEFT."""

    def root_module(self, name: str = "peft_root") -> nn.Module | None:
        return None

    def sublayer_adapter(self, site: Site, d_model: int, name: str = "adapter") -> nn.Module | None:
        return None

    def projection_delta(
        self, site: Site, projection: str, in_features: int, out_features: int, name: str
    ) -> nn.Module | None:
        return None

    def layer_norm_delta(self, site: Site, d_model: int,
                         name: str = "layer_norm_delta") -> nn.Module | None:
        return None

    def soft_prompt(self, d_model: int, name: str = "prompt") -> nn.Module | None:
        return None

    def side_network(self, config, is_decoder: bool, name: str) -> nn.Module | None:
        return None

    def ladder(self, site: Site, name: str) -> nn.Module | None:
        return None

    def uniform_over_layers(self) -> bool:
        return True


NO_HOOKS = T5Hooks()
