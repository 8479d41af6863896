"""The backbone of a run: which model (a local folder, a Hub id downloaded into the HF cache,
or the embedded fallback when the Hub cannot be reached), its tokenizer (the model's own), the
model with the PEFT method, and the checks that the two fit. Shared by `experiments.finetune`
and `experiments.multitask`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from compacter_jax import peft
from compacter_jax.models import hf_io
from compacter_jax.models.config import is_random
from compacter_jax.models.hf_io import ModelNotCachedError
from compacter_jax.tokenizer import tokenizer_for_model
from experiments.configs.glue import DEFAULT_MODEL

log = logging.getLogger(__name__)


def resolve_model(config, *, fallback_from: str | None = DEFAULT_MODEL
                  ) -> tuple[str, Path | None]:
    """(name, local folder or None for `random:`) of the model to train: `config.model`,
    downloaded from the Hub into the HF cache when it is a Hub id not there yet. Only when
    `config.model` is `fallback_from` (the default t5-base of `make run`), it is not cached and
    the Hub cannot be reached (HF_HUB_OFFLINE=1, no connection) is `config.fallback_model`
    used instead, with a banner saying so. Any other failure raises: a model the user names,
    a repo that does not exist or is gated, a local path without config.json."""
    try:
        return config.model, hf_io.model_dir(config.model)
    except ModelNotCachedError as e:
        if not config.fallback_model or config.model != fallback_from:
            raise
        name = config.fallback_model
        banner = "!" * 78
        what = ("randomly initialised weights: scores mean nothing" if is_random(name)
                else "a far smaller backbone than the one asked for (for t5-mini-glue, pretrained "
                     "here on 2 CPU cores: see docs/small_scale.md)")
        warnings.warn(f"\n{banner}\nTHE HUB CANNOT BE REACHED: {e}\nFALLING BACK TO {name}: "
                      f"{what}.\n{banner}", stacklevel=2)
        return name, hf_io.model_dir(name)


def load_tokenizer_for(config, name: str, folder: Path | None):
    """The run's tokenizer: `config.tokenizer` when set (an explicit override, e.g. the shared
    T5 vocabulary), else the model's own (`spiece.model` of its folder or Hub repo), else the
    shared vocabulary (`random:` presets); checked against the model's vocab_size."""
    vocab_size = hf_io.load_config(str(folder) if folder else name).vocab_size
    return tokenizer_for_model(folder, config.tokenizer or None, vocab_size=vocab_size,
                               model=name)


def load_model(config, method: peft.Method, rng, *, fallback_from: str | None = DEFAULT_MODEL,
               resolved: tuple[str, Path | None] | None = None, vocab_size: int | None = None):
    """(model, params, name): the model of `resolve_model(config)` (or `resolved`, its result),
    with the method. Layers are scanned when asked and the method places the same modules in
    every block. `vocab_size`: the vocabulary cut to its first entries (HF
    `resize_token_embeddings`; see `tokenizer_vocab_size`)."""
    name, folder = resolved or resolve_model(config, fallback_from=fallback_from)
    scan = config.scan_layers and method.hooks().uniform_over_layers()
    if config.scan_layers and not scan:
        log.info("%s places its modules in some blocks only: layers are not scanned",
                 method.name)
    kwargs = dict(rng=rng, dtype=config.dtype, scan_layers=scan, remat=config.remat,
                  vocab_size=vocab_size)
    model, params = peft.from_pretrained(str(folder) if folder else name, method, **kwargs)
    return model, params, name


def tokenizer_vocab_size(config, tokenizer) -> int | None:
    """len(tokenizer) when `resize_vocab_to_tokenizer` (the original's
    `model.resize_token_embeddings(len(tokenizer))`), else None (the checkpoint's size)."""
    return len(tokenizer) if config.get("resize_vocab_to_tokenizer", False) else None


def check_tokenizer_fits(tokenizer, model) -> None:
    """Refuses a tokenizer with ids the model has no embedding row for (they would be looked
    up out of range), naming both sizes."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} entries but the model's "
                         f"vocabulary only {model.config.vocab_size}: ids >= "
                         f"{model.config.vocab_size} have no embedding; use the model's own "
                         "tokenizer (--config.tokenizer)")
