"""PeftConfig presets, overrides and input validation."""

import pytest

from compacter_jax.peft import methods
from compacter_jax.peft.methods import PeftConfig, get_method, validate

EXPECTED = ("full", "adapter", "pfeiffer", "adapterdrop", "lowrank", "phm_adapter", "compacter",
            "compacter++", "bitfit", "prompt_tuning", "lora")


def test_presets_and_their_key_fields():
    assert methods.method_names() == EXPECTED
    c = get_method("compacter")
    assert (c.projection, c.n, c.rank, c.shared_rule, c.positions, c.reduction_factor) == (
        "lphm", 4, 1, True, ("self_attention", "feed_forward"), 32)
    assert get_method("compacter++").positions == ("feed_forward",)
    assert get_method("phm_adapter").n == 12 and not get_method("phm_adapter").shared_rule
    assert get_method("pfeiffer").positions == ("self_attention",)
    assert get_method("adapterdrop").drop_first == 5
    assert all(get_method(m).train_layer_norms for m in EXPECTED[1:8])
    assert not any(get_method(m).train_layer_norms for m in ("bitfit", "prompt_tuning", "lora"))
    assert get_method("full").train_all and get_method("prompt_tuning").prompt_length == 100
    assert set(methods.RECOMMENDED_LR) == set(EXPECTED)
    hash(get_method("compacter"))     # static model structure: must be hashable


def test_overrides_replace_fields_and_rerun_checks():
    c = get_method("compacter++", reduction_factor=16, n=8, positions=["feed_forward"])
    assert (c.reduction_factor, c.n, c.positions, c.method) == (16, 8, ("feed_forward",),
                                                                "compacter++")
    with pytest.raises(ValueError, match="n must be >= 1"):
        get_method("compacter", n=0)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown PEFT method 'compactor'.*compacter\+\+.*lora"):
        get_method("compactor")


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown PeftConfig field\(s\) \['phm_dim'\]"):
        get_method("compacter", phm_dim=4)


def test_positions_validation():
    with pytest.raises(ValueError, match="never go after decoder cross-attention"):
        get_method("adapter", positions=("self_attention", "cross_attention"))
    with pytest.raises(ValueError, match=r"unknown \['attention'\]"):
        PeftConfig(projection="dense", positions=("attention",))
    with pytest.raises(ValueError, match=r"stacks has unknown \['lm_head'\]"):
        PeftConfig(projection="dense", stacks=("lm_head",))


def test_other_field_validation():
    with pytest.raises(ValueError, match="projection='conv'"):
        PeftConfig(projection="conv")
    with pytest.raises(ValueError, match="shared_rule=True needs projection"):
        PeftConfig(projection="dense", shared_rule=True)
    with pytest.raises(ValueError, match=r"lora_targets has unknown \['query'\]"):
        get_method("lora", lora_targets=("query",))
    with pytest.raises(ValueError, match="prompt_init='zeros'"):
        get_method("prompt_tuning", prompt_init="zeros")
    with pytest.raises(ValueError, match="prompt_vocab_ids has 2 ids"):
        get_method("prompt_tuning", prompt_vocab_ids=(1, 2))


def test_validate_against_model_dims():
    validate(get_method("compacter"), d_model=768, num_layers=12)
    validate(get_method("phm_adapter"), d_model=768, num_layers=12)
    # d_model 64 / 32 -> bottleneck 2, not divisible by n = 4.
    with pytest.raises(ValueError, match=r"bottleneck 2.*out_features=2 is not divisible by n=4"):
        validate(get_method("compacter"), d_model=64)
    with pytest.raises(ValueError, match=r"in_features=100 is not divisible by n=8"):
        validate(get_method("compacter", n=8, reduction_factor=25), d_model=100)
    with pytest.raises(ValueError, match=r"rank=4 .*lower `rank`"):
        validate(get_method("compacter", rank=4, reduction_factor=8), d_model=64)   # 8/4 = 2
    with pytest.raises(ValueError, match="rank=9 exceeds the bottleneck 8"):
        validate(get_method("lowrank", rank=9, reduction_factor=8), d_model=64)
    with pytest.raises(ValueError, match="drop_first=5 removes every adapter of a 2-block"):
        validate(get_method("adapterdrop"), d_model=768, num_layers=2)
    with pytest.raises(ValueError, match="blocks=.*beyond the 2 blocks"):
        validate(get_method("adapter", blocks=(0, 3)), d_model=768, num_layers=2)
    with pytest.raises(ValueError, match="prompt_vocab_ids must lie in"):
        validate(get_method("prompt_tuning", prompt_length=2, prompt_vocab_ids=(0, 99)),
                 d_model=8, vocab_size=10)


def test_block_selection():
    drop = get_method("adapterdrop")
    assert [i for i in range(12) if drop.block_has_adapter(i)] == list(range(5, 12))
    assert drop.layer_dependent and not get_method("compacter").layer_dependent
    picked = get_method("adapter", blocks=(0, 2))
    assert [i for i in range(4) if picked.block_has_adapter(i)] == [0, 2]
