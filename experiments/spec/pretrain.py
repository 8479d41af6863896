"""A pretraining run's config, checked (model sizes bounded by the package's `MAX_SIZES` and
the device's memory) and resolved into a typed `PretrainSpec`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from compacter_jax.models.config import MAX_PARAMS, MAX_SIZES, T5Config, backbone_param_count
from experiments.spec.fields import (ConfigError, check_fields, check_float, check_int, flag,
                                     pretrain_defaults)


def _available_memory() -> int | None:
    """Bytes of memory of the first JAX device (its allocator's limit on an accelerator, the
    machine's physical memory on CPU); None when unknown."""
    import jax  # noqa: PLC0415

    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# Training a parameter costs its float32 value, gradient and two AdamW moments, at least.
BYTES_PER_TRAINED_PARAM = 16
MODEL_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
                "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs")


def check_model_sizes(model: Mapping[str, Any], vocab_size: int, *,
                      memory: int | None = None) -> int:
    """Refuses a `--config.model.<field>` the T5 does not have, a size out of the package's
    bounds (`models.config.MAX_SIZES`), and a model whose training state cannot fit in
    `memory` bytes (default: the first device's).

    Returns:
      the number of backbone parameters.
    """
    for key in model.keys():
        if key not in MODEL_FIELDS:
            raise ConfigError(f"--config.model.{key}: config.model has no field {key!r}; "
                              f"valid fields: {', '.join(MODEL_FIELDS)}")
    for key, limit in MAX_SIZES.items():
        if key not in model:
            continue
        value = model[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
                1 <= value <= limit):
            raise ConfigError(f"{flag('model.' + key, value)}: must be an integer in "
                              f"1..{limit:,}")
    sizes = {**dataclasses.asdict(T5Config()), **dict(model), "vocab_size": max(vocab_size, 1)}
    total = backbone_param_count(sizes)
    memory = _available_memory() if memory is None else memory
    need = total * BYTES_PER_TRAINED_PARAM
    if total > MAX_PARAMS or (memory is not None and need > memory):
        fields = ", ".join(f"{k}={sizes[k]}" for k in ("d_model", "d_ff", "num_layers",
                                                      "num_decoder_layers", "vocab_size"))
        raise ConfigError(
            f"--config.model ({fields}) has {total:,} parameters: training needs about "
            f"{need / 2**30:.3g} GiB, more than the {(memory or 0) / 2**30:.3g} GiB of this "
            "device; use smaller --config.model.* sizes")
    return total



PRETRAIN_OPTIMIZERS = ("adamw", "adafactor")


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """A pretraining config, checked, with its sentinels resolved.

    Attributes:
      total_steps: `num_train_steps` (> 0).
      stop_at_most: `stop_after` (None: run to the end).
      export_dir: None = `<workdir>/hf`.
      vocab_size: None = the tokenizer's size (`vocab_size=0`).
      clip_norm: None = no clipping (`clip_norm=0`).
      tasks: None = every task with local training data (`tasks=""`).
    """

    total_steps: int
    stop_at_most: int | None
    export_dir: str | None
    vocab_size: int | None
    clip_norm: float | None
    tasks: tuple[str, ...] | None


def pretrain_spec(config) -> PretrainSpec:
    """Checks a pretraining config (`experiments/configs/pretrain.py`) and resolves it.

    Raises:
      ConfigError naming the field and the fix.
    """
    check_fields(config, pretrain_defaults(), free=("model",))
    total = int(config.num_train_steps) if isinstance(config.num_train_steps, int) else 0
    if total <= 0:
        raise ConfigError(f"--config.num_train_steps must be positive, got "
                          f"{config.num_train_steps!r}")
    positive = (lambda v: v >= 1, "a positive integer")
    for field in ("batch_size", "eval_batch_size", "inputs_length", "keep_checkpoints",
                  "tokenizer_vocab_size"):
        check_int(config, field, *positive)
    for field in ("log_every", "eval_every", "save_every", "warmup_steps"):
        check_int(config, field, lambda v: v >= 0, "0 (never) or a number of steps")
    check_int(config, "stop_after", lambda v: v == -1 or v >= 1,
              "-1 (run to the end) or a number of steps")
    check_int(config, "vocab_size", lambda v: v >= 0, "0 (the tokenizer's size) or more")
    for field in ("seed", "data_seed", "heldout_corruption_seed"):
        check_int(config, field, lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1")
    check_float(config, "noise_density", lambda v: 0 < v < 1,
                "in (0, 1), the share of tokens corrupted (T5: 0.15)")
    check_float(config, "mean_noise_span_length", lambda v: v >= 1,
                "1 or more tokens per span (T5: 3.0)")
    check_float(config, "heldout_fraction", lambda v: 0 < v < 1, "in (0, 1)")
    check_float(config, "denoise_fraction", lambda v: 0 <= v <= 1, "in [0, 1]")
    check_float(config, "learning_rate", lambda v: 0 < v <= float(np.finfo(np.float32).max),
                "a positive finite float32 (e.g. 2e-3)")
    check_float(config, "weight_decay", lambda v: v >= 0, "0 or more")
    check_float(config, "clip_norm", lambda v: v >= 0, "0 (no clipping) or more")
    check_float(config, "export_dropout_rate", lambda v: 0 <= v < 1, "in [0, 1)")
    if config.optimizer not in PRETRAIN_OPTIMIZERS:
        raise ConfigError(f"{flag('optimizer', config.optimizer)}: use one of "
                          f"{', '.join(PRETRAIN_OPTIMIZERS)}")
    # 32,100 pieces of the shared T5 vocabulary, or the trained tokenizer's pieces + sentinels.
    vocab = config.vocab_size or (config.tokenizer_vocab_size + 100 if config.tokenizer == "train"
                                  else 32100)
    check_model_sizes(config.model, vocab)
    tasks = tuple(t.strip() for t in str(config.tasks).split(",") if t.strip())
    return PretrainSpec(total_steps=total,
                        stop_at_most=None if config.stop_after <= 0 else config.stop_after,
                        export_dir=config.export_dir or None,
                        vocab_size=config.vocab_size or None,
                        clip_norm=config.clip_norm or None, tasks=tasks or None)
