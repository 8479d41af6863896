"""`PeftHooks`: a `PeftConfig` turned into the T5 insertion points (models/hooks.py).

Placement:
* adapters: after the sublayers in `config.positions` (self-attention and/or feed-forward;
  never cross-attention) of the stacks in `config.stacks`, in the selected blocks;
* Compacter's shared rule: `peft_root/phm_rule` [n, n, n], passed to every PHM layer;
* LoRA: `{proj}_delta/{lora_a, lora_b}` beside the projections named in `lora_targets`, in
  self-attention, cross-attention and feed-forward alike (and the lm_head if listed);
* BitFit: `{proj}_delta/bias` beside every projection (q, k, v, o of self- and cross-attention,
  wi / wi_0, wi_1, wo) and `lm_head_delta/bias` [vocab]. The original code also adds biases to
  the 62 layer norms (47,616 params in T5-base, spec §4 "≈281k"). In pre-LN T5 a norm's
  output only feeds the projections that follow it, whose own biases absorb a norm bias
  (b shifts q by the constant b @ Wq; exact without dropout, which sits between the final
  norms and the next projection), so those would only re-parameterise the same function and
  are left out: BitFit here trains 234,880 params in T5-base (202,752 + 32,128 lm_head);
* prompt tuning: `encoder/prompt/embedding` [length, d_model].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from compacter_jax.models.hooks import Site, T5Hooks
from compacter_jax.peft import layers
from compacter_jax.peft.methods import PeftConfig, validate


@dataclasses.dataclass(frozen=True)
class PeftHooks(T5Hooks):
    """Hooks of one PEFT method. `dtype` (e.g. "bfloat16", None = promote) is the compute dtype
    of the inserted modules; their parameters are float32."""

    config: PeftConfig
    dtype: str | None = None

    def root_module(self, name: str = "peft_root") -> nn.Module | None:
        if not self.config.uses_shared_rule:
            return None
        std = self.config.rule_init_std or layers.SHARED_RULE_STD
        return layers.PeftRoot(n=self.config.n, rule_std=std, name=name)

    def _adapter_here(self, site: Site) -> bool:
        cfg = self.config
        if not cfg.has_adapters or site.sublayer not in cfg.positions or site.stack not in cfg.stacks:
            return False
        if site.layer is None:          # scanned layers: the same modules in every block
            if cfg.layer_dependent:
                raise ValueError(f"{cfg.method}: adapters only in some blocks (drop_first="
                                 f"{cfg.drop_first}, blocks={cfg.blocks}) cannot be scanned; "
                                 "use scan_layers=False")
            return True
        return cfg.block_has_adapter(site.layer)

    def sublayer_adapter(self, site: Site, d_model: int, name: str = "adapter") -> nn.Module | None:
        if not self._adapter_here(site):
            return None
        cfg = self.config
        return layers.Adapter(
            reduction_factor=cfg.reduction_factor, projection=cfg.projection, n=cfg.n,
            rank=cfg.rank, use_shared_rule=cfg.shared_rule,
            own_rule_std=cfg.rule_init_std or layers.OWN_RULE_STD,
            phm_path=cfg.phm_path, dtype=self.dtype, name=name)

    def projection_delta(self, site: Site, projection: str, in_features: int,
                         out_features: int, name: str) -> nn.Module | None:
        cfg = self.config
        if cfg.bitfit:
            return layers.BitFitBias(out_features, dtype=self.dtype, name=name)
        if cfg.lora_rank > 0 and projection in cfg.lora_targets:
            return layers.LoRA(out_features, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                               dtype=self.dtype, name=name)
        return None

    def soft_prompt(self, d_model: int, name: str = "prompt") -> nn.Module | None:
        cfg = self.config
        if cfg.prompt_length <= 0:
            return None
        return layers.SoftPrompt(cfg.prompt_length, d_model, init_scheme=cfg.prompt_init,
                                 init_range=cfg.prompt_init_range, name=name)

    def uniform_over_layers(self) -> bool:
        return not self.config.layer_dependent


def build_model(t5_config: Any, peft_config: PeftConfig):
    """T5ForConditionalGeneration(t5_config) with the hooks of `peft_config` (validated)."""
    from compacter_jax.models.t5 import T5ForConditionalGeneration

    validate(peft_config, t5_config.d_model,
             min(t5_config.num_layers, t5_config.num_decoder_layers), t5_config.vocab_size)
    hooks = PeftHooks(peft_config, dtype=t5_config.dtype)
    return T5ForConditionalGeneration(t5_config, hooks=hooks)
