"""The presets: every Table 1 row (and LoRA) with its key fields and learning rate; overrides;
unknown names and fields; the CLI field union."""

import pytest

from compacter_jax import peft
from compacter_jax.peft import registry
from compacter_jax.peft.registry import get_method

EXPECTED = ("full", "adapter", "pfeiffer", "adapterdrop", "lowrank", "phm_adapter", "compacter",
            "compacter++", "bitfit", "prompt_tuning", "lora", "bitfit_projections",
            "prompt_tuning_vocab", "intrinsic_said", "lst", "attempt", "sparse_adapter",
            "large_sparse_adapter", "dsee")
ADAPTERS = EXPECTED[1:8]
LN_SCALE = ("encoder", "final_layer_norm", "scale")
# The original configs' peak learning rates (paper §5; LoRA is not in the paper).
PAPER_LR = {"full": 3e-4, "adapter": 3e-4, "pfeiffer": 3e-4, "adapterdrop": 3e-4,
            "lowrank": 3e-3, "phm_adapter": 3e-3, "compacter": 3e-3, "compacter++": 3e-3,
            "bitfit": 3e-4, "bitfit_projections": 3e-4, "prompt_tuning": 3e-2,
            "prompt_tuning_vocab": 3e-1, "lora": 1e-3, "intrinsic_said": 3e-2,
            "lst": 3e-3,  # LST: its authors' scripts/ladder_side_tuning_base.sh
            "attempt": 3e-1, "sparse_adapter": 3e-4, "large_sparse_adapter": 3e-4, "dsee": 5e-4}


def test_presets_and_their_key_fields():
    assert registry.method_names() == EXPECTED
    c = get_method("compacter")
    assert (c.projection, c.n, c.rank, c.shared_rule, c.positions, c.reduction_factor) == (
        "lphm", 4, 1, True, ("self_attention", "feed_forward"), 32)
    assert get_method("compacter++").positions == ("feed_forward",)
    assert get_method("phm_adapter").n == 12 and not get_method("phm_adapter").shared_rule
    assert get_method("pfeiffer").positions == ("self_attention",)
    assert get_method("adapterdrop").drop_first == 5
    assert all(get_method(m).train_layer_norms for m in ADAPTERS)
    assert all(get_method(m).is_trainable(LN_SCALE) for m in ADAPTERS)
    assert not any(get_method(m).is_trainable(LN_SCALE)
                   for m in ("bitfit", "prompt_tuning", "lora", "intrinsic_said"))
    assert isinstance(get_method("full"), peft.FullFineTuning)
    assert get_method("full").is_trainable(("shared", "embedding"))
    assert get_method("prompt_tuning").length == 100
    assert get_method("prompt_tuning_vocab").init == "vocab"
    assert get_method("bitfit").layer_norms and not get_method("bitfit_projections").layer_norms
    assert {m: get_method(m).learning_rate for m in EXPECTED} == PAPER_LR
    assert [m for m in EXPECTED if get_method(m).task_prefix] == [
        "full", "bitfit", "prompt_tuning", "bitfit_projections", "prompt_tuning_vocab",
        "intrinsic_said", "lst", "attempt"]
    hash(get_method("compacter"))     # static model structure: must be hashable


def test_overrides_replace_fields_and_rerun_checks():
    c = get_method("compacter++", reduction_factor=16, n=8, positions=["feed_forward"])
    assert (c.reduction_factor, c.n, c.positions, c.name) == (16, 8, ("feed_forward",),
                                                              "compacter++")
    with pytest.raises(ValueError, match="n must be >= 1"):
        get_method("compacter", n=0)
    assert get_method(c) is c and get_method(c, n=4).n == 4


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown PEFT method 'compactor'.*compacter\+\+.*lora"):
        get_method("compactor")


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['phm_dim'\] for method "
                                         r"'compacter'.*valid fields: projection"):
        get_method("compacter", phm_dim=4)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n'\] for method 'lora'"):
        get_method("lora", n=4)


def test_a_value_of_the_wrong_type_is_named():
    """A field given a value its type does not hold fails at the override, naming the field
    and the type (it used to be a TypeError deep in the method's checks)."""
    for field, value, want in (("n", "abc", "int"), ("n", 4.0, "int"), ("n", True, "int"),
                               ("rule_init_std", "x", r"float \| None"),
                               ("positions", ("feed_forward", 1), r"tuple\[str, ...\]")):
        with pytest.raises(ValueError, match=rf"field {field}=.* of method 'compacter' "
                                             rf"\(AdapterMethod\): expected {want}$"):
            get_method("compacter", **{field: value})
    assert get_method("compacter", rule_init_std=1, positions=["feed_forward"]).positions == (
        "feed_forward",)  # an int for a float, a list for a tuple


def test_cli_fields_are_the_union_of_the_families():
    fields = registry.cli_fields()
    assert {"reduction_factor", "n", "rank", "positions", "alpha", "targets", "length",
            "init", "vocab_ids", "layer_norms", "lm_head"} <= set(fields)
    assert "name" not in fields and "learning_rate" not in fields
    assert fields["rank"] is int and fields["alpha"] is float


def test_adding_a_method_is_one_class_and_one_registry_line(monkeypatch, tmp_path):
    """The worked example of docs/DESIGN.md ("Adding a method"): LN-tuning."""
    import dataclasses

    import numpy as np

    from compacter_jax import params as param_report
    from compacter_jax.models import get_preset
    from compacter_jax.peft.method import Method, is_layer_norm_path

    @dataclasses.dataclass(frozen=True)
    class LayerNormTuning(Method):
        final_norms: bool = True

        def is_trainable(self, path):
            return is_layer_norm_path(path) and (self.final_norms
                                                 or "final_layer_norm" not in path)

    monkeypatch.setitem(registry.PRESETS, "ln_tuning",
                        LayerNormTuning(name="ln_tuning", learning_rate=3e-3))
    r = param_report.report(get_preset("t5-base"), get_method("ln_tuning"))
    assert r.trainable == 62 * 768 and r.peft == 0
    assert param_report.report(get_preset("t5-base"),
                               get_method("ln_tuning", final_norms=False)).trainable == 60 * 768
    assert "final_norms" in registry.cli_fields()
    method = get_method("ln_tuning")
    trainable = {"encoder": {"final_layer_norm": {"scale": np.ones(4, np.float32)}}}
    peft.save_adapter(tmp_path / "ln", trainable, method, model="random:t5-tiny", init_seed=0)
    _, meta = peft.load_trainable(tmp_path / "ln")
    assert peft.method_of_export(meta) == method
