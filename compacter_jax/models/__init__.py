"""Flax T5 backbone: config, model (with PEFT insertion points and packed inputs), HF
checkpoint I/O, greedy generation and rank classification."""

from compacter_jax.models.config import PRESETS, T5Config, get_preset
from compacter_jax.models.generation import greedy_generate
from compacter_jax.models.hf_io import (
    from_pretrained, init_fn, init_hook_params, init_params, is_backbone_path, param_shapes,
    save_pretrained, stack_blocks, unstack_blocks)
from compacter_jax.models.hf_io import CORE_BACKBONE_PATHS, missing_backbone_paths
from compacter_jax.models.hooks import NO_HOOKS, Site, T5Hooks
from compacter_jax.models.scoring import candidate_log_likelihoods, rank_classify
from compacter_jax.models.t5 import T5ForConditionalGeneration, shift_right
from compacter_jax.models.vocab import resize_token_embeddings

__all__ = [
    "NO_HOOKS", "PRESETS", "Site", "T5Config", "T5ForConditionalGeneration", "T5Hooks",
    "candidate_log_likelihoods", "from_pretrained", "get_preset", "greedy_generate", "init_fn",
    "init_hook_params", "init_params", "is_backbone_path", "param_shapes", "rank_classify",
    "resize_token_embeddings", "save_pretrained", "shift_right", "stack_blocks",
    "unstack_blocks", "CORE_BACKBONE_PATHS", "missing_backbone_paths",
]
