"""LoRA: deltas beside the targeted projections of every attention sublayer; validation."""

import pytest
from tiny import TINY, shapes

from compacter_jax.models import T5ForConditionalGeneration, param_shapes
from compacter_jax.peft import LoRAMethod, get_method


def test_delta_placement():
    lora = shapes(TINY, get_method("lora"))
    deltas = {p.rsplit("/", 1)[0] for p in lora if "_delta/" in p}
    expected = {f"{s}/block_{i}/{lay}/{att}/{q}_delta"
                for s, lay, att in (("encoder", "layer_0", "SelfAttention"),
                                    ("decoder", "layer_0", "SelfAttention"),
                                    ("decoder", "layer_1", "EncDecAttention"))
                for i in range(2) for q in ("q", "v")}
    assert deltas == expected
    assert lora["encoder/block_0/layer_0/SelfAttention/q_delta/lora_a"].shape == (64, 8)
    assert lora["encoder/block_0/layer_0/SelfAttention/q_delta/lora_b"].shape == (8, 32)  # heads x d_kv


def test_full_fine_tuning_inserts_nothing():
    from flax import traverse_util
    plain = traverse_util.flatten_dict(param_shapes(T5ForConditionalGeneration(TINY)), sep="/")
    assert set(shapes(TINY, get_method("full"))) == set(plain)


def test_validation():
    with pytest.raises(ValueError, match=r"targets has unknown \['query'\]"):
        get_method("lora", targets=("query",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAMethod(rank=0)
    with pytest.raises(ValueError, match="exist only in gated-GELU"):
        get_method("lora", targets=("wi_0",)).validate(TINY)
    with pytest.raises(ValueError, match="'wi' does not exist in a gated-GELU"):
        get_method("lora", targets=("wi",)).validate(TINY.replace(feed_forward_proj="gated-gelu"))
