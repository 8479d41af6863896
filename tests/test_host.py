"""compacter_jax.host: the one NaN/inf check of parameter trees (used by checkpoints, adapter
exports and loaded HF weights)."""

import jax.numpy as jnp
import numpy as np
import pytest

from compacter_jax.host import nonfinite_leaves, param_count


def test_names_the_nonfinite_float_leaves_in_tree_order():
    tree = {"b": {"x": np.array([1.0, np.nan], np.float32), "n": np.array([7], np.int32)},
            "a": jnp.array([np.inf], jnp.bfloat16),        # a device array, a jax float type
            "c": (np.ones(2), np.array([-np.inf, 0.0])),
            "d": np.float64(np.nan), "e": np.ones((0, 3), np.float16)}
    assert nonfinite_leaves(tree) == ["b/x", "a", "c/1", "d"]   # mapping order, not sorted
    assert nonfinite_leaves({"ok": np.zeros(3), "i": np.arange(3)}) == []
    assert nonfinite_leaves([np.ones(1), np.full(2, np.nan)]) == ["1"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, jnp.bfloat16])
def test_every_float_type_is_checked(dtype):
    assert nonfinite_leaves({"w": np.array([0.5, np.nan]).astype(dtype)}) == ["w"]


def test_param_count_is_exact_for_any_size():
    import jax

    from compacter_jax import peft

    tree = {"a": np.ones((3, 4), np.float32), "b": {"c": jnp.zeros(5), "s": np.float32(1)},
            "huge": jax.ShapeDtypeStruct((1 << 20, 1 << 20, 1 << 12), jnp.bfloat16)}
    assert param_count(tree) == 12 + 5 + 1 + 2**52 and isinstance(param_count(tree), int)
    assert peft.count(tree) == param_count(tree) and param_count({}) == 0


def test_the_backbone_formula_agrees_with_the_counter():
    """`models.config.backbone_param_count` counts from sizes alone (untrusted config.json,
    before any tree exists); it must give what the counter gives on the built tree."""
    from flax import traverse_util

    from compacter_jax.models import PRESETS, T5ForConditionalGeneration, is_backbone_path
    from compacter_jax.models.config import backbone_param_count
    from compacter_jax.models.hf_io import param_shapes

    tiny = PRESETS["t5-tiny"]
    for name, config in (("tied relu", tiny), ("untied gated-gelu", tiny.replace(
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3))):
        flat = traverse_util.flatten_dict(param_shapes(T5ForConditionalGeneration(config)))
        backbone = [v for p, v in flat.items() if is_backbone_path(p)]
        assert backbone_param_count(config) == param_count(backbone), name
