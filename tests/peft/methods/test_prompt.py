"""Prompt tuning: one soft prompt before the encoder; vocabulary init; validation."""

import numpy as np
import pytest
from tiny import TINY, shapes

from compacter_jax.peft import PromptTuning, get_method, init_prompt_from_vocab


def test_prompt_placement():
    prompt = shapes(TINY, get_method("prompt_tuning", length=7))
    assert [p for p in prompt if "prompt" in p] == ["encoder/prompt/embedding"]
    assert prompt["encoder/prompt/embedding"].shape == (7, 64)
    assert not get_method("prompt_tuning").packable


def test_validation():
    with pytest.raises(ValueError, match="init='zeros'"):
        get_method("prompt_tuning", init="zeros")
    with pytest.raises(ValueError, match="vocab_ids has 2 ids"):
        get_method("prompt_tuning", vocab_ids=(1, 2))
    with pytest.raises(ValueError, match="vocab_ids must lie in"):
        PromptTuning(length=2, vocab_ids=(0, 99)).validate(TINY.replace(vocab_size=10))
    with pytest.raises(ValueError, match="length must be >= 1"):
        PromptTuning(length=0)


def test_init_from_vocab_needs_a_prompt():
    params = {"shared": {"embedding": np.arange(12.0).reshape(6, 2)},
              "encoder": {"prompt": {"embedding": np.zeros((3, 2))}}}
    out = init_prompt_from_vocab(params, (5, 0, 2))
    np.testing.assert_array_equal(out["encoder"]["prompt"]["embedding"],
                                  params["shared"]["embedding"][[5, 0, 2]])
    np.testing.assert_array_equal(params["encoder"]["prompt"]["embedding"], 0)   # not modified
    with pytest.raises(ValueError, match="no soft prompt"):
        init_prompt_from_vocab({"shared": params["shared"]})
    with pytest.raises(ValueError, match="token_ids has shape"):
        init_prompt_from_vocab(params, (1, 2))
