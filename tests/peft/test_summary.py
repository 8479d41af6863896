"""The per-module trainable-parameter summary (PEFT's print_trainable_parameters)."""

import jax
import numpy as np

import compacter_jax as cj
from compacter_jax.models import get_preset, param_shapes
from compacter_jax.peft import build_model, count_by_module


def test_counts_per_module_with_a_rule():
    params = {"wte": {"embedding": np.zeros((16, 8))},
              "h_0": {"attn": {"c_attn": {"kernel": np.zeros((8, 24))},
                               "lora_a": {"kernel": np.zeros((8, 2))}}},
              "h_1": {"attn": {"c_attn": {"kernel": np.zeros((8, 24))}}},
              "ln_f": {"scale": np.zeros(8)}}
    whole, rows = count_by_module(params, r"lora_|ln_", depth=1)
    assert (whole.trainable, whole.total) == (16 + 8, 128 + 192 + 16 + 192 + 8)
    assert {r.module: (r.trainable, r.total) for r in rows} == {
        "wte": (0, 128), "h_0": (16, 208), "h_1": (0, 192), "ln_f": (8, 8)}
    text = cj.summary(params, r"lora_|ln_", depth=2)
    assert text.splitlines()[0] == ("trainable params: 24 || all params: 536 || "
                                    "trainable%: 4.4776")
    assert "h_0/attn" in text and "ln_f/scale" in text


def test_a_method_on_t5_matches_its_own_count():
    method = cj.get_method("compacter++", reduction_factor=8)
    shapes = param_shapes(build_model(get_preset("t5-tiny"), method))
    whole, rows = count_by_module(shapes, method)
    assert whole.trainable == method.trainable_count(shapes)
    assert whole.total == sum(r.total for r in rows) == cj.count(shapes)
    by = {r.module: r for r in rows}
    # block_0, block_1, ... counted together; the shared rule and final norms fully trainable.
    assert "encoder/block_*" in by and by["peft_root/phm_rule"].percent == 100.0
    assert by["shared/embedding"].trainable == 0
    # Intrinsic-SAID trains a vector beside the tree: the summary reports its size.
    said = cj.get_method("intrinsic_said", dim=100)
    s_shapes = param_shapes(build_model(get_preset("t5-tiny"), said))
    assert count_by_module(s_shapes, said)[0].trainable == said.trainable_count(s_shapes)
    assert jax.tree_util.tree_leaves(s_shapes)
