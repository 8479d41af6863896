"""The Method base: what a parameter path is, replace/to_dict, and the default split."""

import jax
import jax.numpy as jnp
import pytest

from compacter_jax import peft
from compacter_jax.peft.method import Method, is_layer_norm_path, is_peft_path


def test_paths():
    assert is_peft_path(("encoder", "block_0", "layer_1", "adapter", "down", "bias"))
    assert is_peft_path(("peft_root", "phm_rule")) and is_peft_path(("encoder", "prompt", "x"))
    assert is_peft_path(("decoder", "block_1", "layer_0", "SelfAttention", "q_delta", "bias"))
    assert is_peft_path(("encoder", "blocks", "layer_0", "layer_norm_delta", "bias"))
    assert not is_peft_path(("encoder", "block_0", "layer_0", "SelfAttention", "q", "kernel"))
    assert not is_peft_path(("shared", "embedding")) and not is_peft_path(("lm_head", "kernel"))
    assert is_layer_norm_path(("decoder", "blocks", "layer_2", "layer_norm", "scale"))
    assert is_layer_norm_path(("encoder", "final_layer_norm", "scale"))
    assert not is_layer_norm_path(("encoder", "block_0", "layer_0", "layer_norm_delta", "bias"))


def test_replace_to_dict_and_validation():
    m = peft.get_method("lora")
    assert m.replace(rank=4).rank == 4 and m.rank == 8
    assert m.to_dict() == {"family": "LoRAMethod", "name": "lora", "learning_rate": 1e-3,
                           "rank": 8, "alpha": 16.0, "targets": ["q", "v"],
                           "sparsity": 0.0, "prune": "snip"}
    assert peft.method_from_dict(m.to_dict()) == m
    assert Method.config_field_names() == ()
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        Method(learning_rate=0.0)


def test_default_partition_splits_what_the_method_inserted():
    params = {"shared": {"embedding": jnp.zeros((4, 2))},
              "encoder": {"prompt": {"embedding": jnp.ones((3, 2))}}}
    for stack in ("encoder", "decoder"):  # the T5 weights a partition expects
        params.setdefault(stack, {}).update({
            "relative_attention_bias": {"embedding": jnp.zeros((4, 1))},
            "final_layer_norm": {"scale": jnp.ones(2)},
            "block_0": {"layer_0": {"SelfAttention": {"q": {"kernel": jnp.zeros((2, 2))}}}}})
    trainable, frozen = Method().partition(params)
    assert jax.tree_util.tree_structure(trainable) == jax.tree_util.tree_structure(
        {"encoder": {"prompt": {"embedding": 0}}})
    assert set(frozen) == {"shared", "encoder", "decoder"}
    assert Method().combine(trainable, frozen).keys() == params.keys()
