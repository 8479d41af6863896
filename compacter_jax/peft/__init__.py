"""PEFT methods for the Flax T5: PHM math, layers, method presets, hooks and partitioning.

    model, params = from_pretrained_with_method("t5-base", "compacter++")
    labels = label_params(params, get_method("compacter++"))
    trainable, frozen = split(params, labels)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compacter_jax.peft.export import load_adapter, save_adapter
from compacter_jax.peft.hooks import PeftHooks, build_model
from compacter_jax.peft.methods import (PRESETS, RECOMMENDED_LR, PeftConfig, get_method,
                                        method_names, validate)
from compacter_jax.peft.partition import (FROZEN, TRAINABLE, count, label_params, make_optimizer,
                                          merge, split, trainable_count)

__all__ = [
    "FROZEN", "PRESETS", "RECOMMENDED_LR", "TRAINABLE", "PeftConfig", "PeftHooks", "build_model",
    "count", "from_pretrained_with_method", "get_method", "init_prompt_from_vocab",
    "label_params", "load_adapter", "make_optimizer", "merge", "method_names", "save_adapter", "split", "trainable_count",
    "validate",
]


def init_prompt_from_vocab(params: dict, token_ids: Any = None) -> dict:
    """Copies token-embedding rows `shared/embedding[token_ids]` into the soft prompt
    `encoder/prompt/embedding` [length, d_model]; token_ids default 0..length-1 (as the
    original code). Returns a new param dict (the input is not modified)."""
    try:
        prompt = params["encoder"]["prompt"]["embedding"]
    except KeyError:
        raise ValueError("params have no encoder/prompt/embedding: the model has no soft "
                         "prompt (use a prompt_tuning config)") from None
    ids = jnp.arange(prompt.shape[0]) if token_ids is None else jnp.asarray(token_ids, jnp.int32)
    if ids.shape != (prompt.shape[0],):
        raise ValueError(f"token_ids has shape {ids.shape}, the prompt has {prompt.shape[0]} rows")
    rows = params["shared"]["embedding"][ids].astype(prompt.dtype)
    encoder = {**params["encoder"], "prompt": {**params["encoder"]["prompt"], "embedding": rows}}
    return {**params, "encoder": encoder}


def from_pretrained_with_method(name_or_path: str, method: str | PeftConfig,
                                rng: jax.Array | None = None, *, dtype: str = "float32",
                                param_dtype: str = "float32", scan_layers: bool = False,
                                remat: bool = False, **overrides: Any):
    """(model, params): the T5 backbone from `name_or_path` (checkpoint dir, cached Hub id or
    `random:<preset>`) with the PEFT method `method` (preset name or PeftConfig, with
    `overrides` of its fields). Backbone params are loaded unchanged; only the new PEFT params
    are initialised (with `rng`). "vocab" prompt init copies embedding rows after loading."""
    from compacter_jax.models import from_pretrained

    config = get_method(method, **overrides) if isinstance(method, str) else method.replace(
        **overrides)
    hooks = PeftHooks(config, dtype=dtype)
    model, params = from_pretrained(name_or_path, hooks=hooks, dtype=dtype,
                                    param_dtype=param_dtype, scan_layers=scan_layers,
                                    remat=remat, rng=rng)
    t5 = model.config
    validate(config, t5.d_model, min(t5.num_layers, t5.num_decoder_layers), t5.vocab_size)
    if config.prompt_length and config.prompt_init == "vocab":
        params = init_prompt_from_vocab(params, config.prompt_vocab_ids)
    return model, params
