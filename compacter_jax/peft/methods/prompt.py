"""Prompt tuning (Lester et al. 2021): `length` trainable vectors prepended to the encoder's
input embeddings (`encoder/prompt/embedding` [length, d_model]), as the original code does
(encoder only; the attention mask gets `length` ones in front).

Initialisation: "uniform" U(-init_range, init_range) (the original's random init, 0.5;
paper row "Prompt Tuning-R", lr 3e-2), "normal" N(0, init_range), or "vocab": the rows
`vocab_ids` of the token embedding (default 0..length-1, as the original's
`init_prefix_from_vocab`; paper row "Prompt Tuning-T", lr 3e-1), copied after loading.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from compacter_jax.models import T5Config, T5Hooks
from compacter_jax.peft import layers
from compacter_jax.peft.method import Method, as_tuple


@dataclasses.dataclass(frozen=True)
class PromptTuning(Method):
    """Attributes:
      length: number of soft-prompt tokens.
      init: "uniform" | "normal" | "vocab"; init_range: the uniform bound / normal std.
      vocab_ids: token ids whose embeddings start the prompt ("vocab" init); None = 0..length-1.
    Packed inputs are not supported (a prompt per segment would change every row's layout).
    """

    length: int = 100
    init: str = "uniform"
    init_range: float = 0.5
    vocab_ids: tuple[int, ...] | None = None

    packable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "vocab_ids", as_tuple(self.vocab_ids))
        if self.length < 1:
            raise ValueError(f"{self.name}: length must be >= 1, got {self.length}")
        if self.init not in layers.PROMPT_INITS:
            raise ValueError(f"{self.name}: init={self.init!r}; use one of {layers.PROMPT_INITS}")
        if self.vocab_ids is not None and len(self.vocab_ids) != self.length:
            raise ValueError(f"{self.name}: vocab_ids has {len(self.vocab_ids)} ids, length is "
                             f"{self.length}")

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return PromptHooks(self)

    def validate(self, t5: T5Config) -> None:
        validate_vocab_init(self, t5)

    def prepare(self, params: dict, t5: T5Config) -> dict:
        if self.init != "vocab":
            return params
        return init_prompt_from_vocab(params, self.vocab_ids)


@dataclasses.dataclass(frozen=True)
class PromptHooks(T5Hooks):
    method: PromptTuning

    def soft_prompt(self, d_model: int, name: str = "prompt") -> nn.Module | None:
        m = self.method
        return layers.SoftPrompt(m.length, d_model, init_scheme=m.init, init_range=m.init_range,
                                 name=name)


def init_prompt_from_vocab(params: dict, token_ids: Any = None) -> dict:
    """Copies token-embedding rows `shared/embedding[token_ids]` into the soft prompt
    `encoder/prompt/embedding` [length, d_model]; token_ids default 0..length-1 (as the
    original code). Returns a new param dict (the input is not modified)."""
    try:
        prompt = params["encoder"]["prompt"]["embedding"]
    except KeyError:
        raise ValueError("params have no encoder/prompt/embedding: the model has no soft "
                         "prompt (use a prompt_tuning method)") from None
    ids = jnp.arange(prompt.shape[0]) if token_ids is None else jnp.asarray(token_ids, jnp.int32)
    if ids.shape != (prompt.shape[0],):
        raise ValueError(f"token_ids has shape {ids.shape}, the prompt has {prompt.shape[0]} rows")
    rows = params["shared"]["embedding"][ids].astype(prompt.dtype)
    encoder = {**params["encoder"], "prompt": {**params["encoder"]["prompt"], "embedding": rows}}
    return {**params, "encoder": encoder}


def validate_vocab_init(method, t5: T5Config) -> None:
    """A prompt copied from vocabulary rows (`init="vocab"`, prompt tuning and ATTEMPT's target
    prompt) must name rows the model has: `vocab_ids` in range, `length` rows available."""
    if method.vocab_ids is not None and any(not 0 <= i < t5.vocab_size
                                            for i in method.vocab_ids):
        raise ValueError(f"{method.name}: vocab_ids must lie in [0, vocab_size={t5.vocab_size})")
    if method.init == "vocab" and method.vocab_ids is None and method.length > t5.vocab_size:
        raise ValueError(f"{method.name}: length={method.length} exceeds the vocabulary "
                         f"({t5.vocab_size}) that 'vocab' init copies from")
