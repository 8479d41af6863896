"""Cutting T5's vocabulary to a tokenizer's size, as HF `resize_token_embeddings` does.

The public T5 checkpoints have 32,128 embedding rows (padded to a multiple of 128) while the
tokenizer has 32,100 entries; the Compacter original calls
`model.resize_token_embeddings(len(tokenizer))` before training, so its softmax has 32,100
logits (and BitFit's lm_head bias 32,100 entries). HF's resize keeps the first n rows of the
shared embedding and, for an untied lm_head (T5 v1.1), the first n rows of `lm_head.weight`
(here the first n columns of the Flax kernel [d_model, vocab]). Growing (new rows, randomly
initialised by HF) is refused: no tokenizer this library uses is larger than its model.
"""

from __future__ import annotations

from typing import Any

import flax.traverse_util as traverse_util

from compacter_jax.models.config import T5Config
from compacter_jax.models.hf_io import is_backbone_path

EMBEDDING = ("shared", "embedding")  # [vocab, d_model]
LM_HEAD = ("lm_head", "kernel")      # [d_model, vocab], untied models only


def check_vocab_size(config: T5Config, new_size: int) -> None:
    """Raises ValueError unless `new_size` is a vocabulary `config`'s model can be cut to."""
    if isinstance(new_size, bool) or not isinstance(new_size, int) or new_size < 1:
        raise ValueError(f"vocabulary size must be a positive integer, got {new_size!r}")
    if new_size > config.vocab_size:
        raise ValueError(
            f"cannot resize the vocabulary from {config.vocab_size} to {new_size} entries: "
            "only cutting is supported (new rows would be untrained); use a tokenizer with at "
            f"most {config.vocab_size} entries")


def resize_token_embeddings(params: Any, config: T5Config, new_size: int
                            ) -> tuple[dict, T5Config]:
    """(params, config) with the vocabulary cut to its first `new_size` entries.

    Args:
      params: a T5 param tree (scanned or not). The other backbone weights, and PEFT params
        that do not depend on the vocabulary (adapters, LoRA on attention), pass unchanged.
      config: its T5Config.
      new_size: the number of entries to keep (<= config.vocab_size), e.g. len(tokenizer).
    Returns:
      The tree with `shared/embedding` [new_size, d_model] (and, untied, `lm_head/kernel`
      [d_model, new_size]) and `config.replace(vocab_size=new_size)`. The logits of the kept
      ids are unchanged; only the softmax loses the cut entries.
    Raises:
      ValueError for growth, for a tree without the embedding, and for a non-backbone leaf
      with a dimension equal to the old vocabulary size (e.g. BitFit's lm_head bias: resize
      the backbone before adding such parameters).
    """
    check_vocab_size(config, new_size)
    flat = traverse_util.flatten_dict(params)
    if EMBEDDING not in flat:
        raise ValueError("resize_token_embeddings: the tree has no shared/embedding")
    out = {}
    for path, value in flat.items():
        if path == EMBEDDING:
            value = value[:new_size]
        elif path == LM_HEAD:
            value = value[:, :new_size]
        elif (not is_backbone_path(path) and config.vocab_size in tuple(value.shape)
              and new_size != config.vocab_size):
            raise ValueError(
                f"resize_token_embeddings: parameter {'/'.join(path)} {tuple(value.shape)} has "
                f"a dimension of the vocabulary size {config.vocab_size} and is not the "
                "embedding or lm_head: resize the backbone before adding it")
        out[path] = value
    return traverse_util.unflatten_dict(out), config.replace(vocab_size=new_size)
