"""The adapter family: field and model-size validation, where each preset inserts what,
Compacter's one shared rule, identity at init, scanning."""

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import FIT, TINY, TINY12, ids, init_fn, shapes

from compacter_jax.models import T5ForConditionalGeneration
from compacter_jax.peft import AdapterMethod, build_model, get_method

SUBLAYER = {("encoder", "self_attention"): "layer_0", ("encoder", "feed_forward"): "layer_1",
            ("decoder", "self_attention"): "layer_0", ("decoder", "feed_forward"): "layer_2"}


def test_positions_validation():
    with pytest.raises(ValueError, match="never go after decoder cross-attention"):
        get_method("adapter", positions=("self_attention", "cross_attention"))
    with pytest.raises(ValueError, match=r"unknown \['attention'\]"):
        AdapterMethod(projection="dense", positions=("attention",))
    with pytest.raises(ValueError, match=r"stacks has unknown \['lm_head'\]"):
        AdapterMethod(projection="dense", stacks=("lm_head",))


def test_other_field_validation():
    with pytest.raises(ValueError, match="projection='conv'"):
        AdapterMethod(projection="conv")
    with pytest.raises(ValueError, match="shared_rule=True needs projection"):
        AdapterMethod(projection="dense", shared_rule=True)
    with pytest.raises(ValueError, match="phm_path='fast'"):
        get_method("compacter", phm_path="fast")


def test_validate_against_model_dims():
    t5_base = TINY.replace(d_model=768, num_layers=12, num_decoder_layers=12)
    get_method("compacter").validate(t5_base)
    get_method("phm_adapter").validate(t5_base)
    # d_model 64 / 32 -> bottleneck 2, not divisible by n = 4.
    with pytest.raises(ValueError, match=r"bottleneck 2.*out_features=2 is not divisible by n=4"):
        get_method("compacter").validate(TINY)
    with pytest.raises(ValueError, match=r"in_features=100 is not divisible by n=8"):
        get_method("compacter", n=8, reduction_factor=25).validate(TINY.replace(d_model=100))
    with pytest.raises(ValueError, match=r"rank=4 .*lower `rank`"):
        get_method("compacter", rank=4, reduction_factor=8).validate(TINY)   # 8/4 = 2
    with pytest.raises(ValueError, match="rank=9 exceeds the bottleneck 8"):
        get_method("lowrank", rank=9, reduction_factor=8).validate(TINY)
    with pytest.raises(ValueError, match="drop_first=5 removes every adapter of a 2-block"):
        get_method("adapterdrop").validate(t5_base.replace(num_layers=2, num_decoder_layers=2))
    with pytest.raises(ValueError, match="blocks=.*beyond the 2 blocks"):
        get_method("adapter", blocks=(0, 3)).validate(t5_base.replace(num_layers=2,
                                                                       num_decoder_layers=2))
    with pytest.raises(ValueError, match="leaves no bottleneck"):
        get_method("adapter", reduction_factor=128).validate(TINY)


def test_block_selection():
    drop = get_method("adapterdrop")
    assert [i for i in range(12) if drop.block_has_adapter(i)] == list(range(5, 12))
    assert drop.layer_dependent and not get_method("compacter").layer_dependent
    assert not drop.hooks().uniform_over_layers() and get_method("compacter").hooks(
        ).uniform_over_layers()
    picked = get_method("adapter", blocks=(0, 2))
    assert [i for i in range(4) if picked.block_has_adapter(i)] == [0, 2]


def _adapter_sites(flat):
    return {tuple(p.split("/")[:3]) for p in flat if "/adapter/" in p}


def _expected_sites(t5, method):
    out = set()
    for stack, n in (("encoder", t5.num_layers), ("decoder", t5.num_decoder_layers)):
        if stack not in method.stacks:
            continue
        for i in range(n):
            if method.block_has_adapter(i):
                out |= {(stack, f"block_{i}", SUBLAYER[stack, pos]) for pos in method.positions}
    return out


@pytest.mark.parametrize("name,t5,overrides", [
    ("adapter", TINY, FIT), ("pfeiffer", TINY, FIT), ("lowrank", TINY, FIT),
    ("compacter", TINY, FIT), ("compacter++", TINY, FIT), ("phm_adapter", TINY, dict(n=8, **FIT)),
    ("adapterdrop", TINY12, dict(reduction_factor=4)),
    ("adapter", TINY12, dict(reduction_factor=4, blocks=(0, 11), stacks=("decoder",))),
])
def test_adapter_placement(name, t5, overrides):
    method = get_method(name, **overrides)
    flat = shapes(t5, method)
    sites = _adapter_sites(flat)
    assert sites == _expected_sites(t5, method)
    assert not any(s[2] == "layer_1" and s[0] == "decoder" for s in sites)   # no cross-attention
    if name == "adapterdrop":   # blocks 5..11 of each 12-block stack: 7 x 2 x 2 adapters
        assert len(sites) == 28 and min(int(s[1][6:]) for s in sites) == 5
    rules = [p for p in flat if p.endswith("phm_rule")]
    if method.shared_rule:
        assert rules == ["peft_root/phm_rule"] and flat[rules[0]].shape == (4, 4, 4)
    elif method.projection == "phm":   # one own rule per down / up projection
        assert len(rules) == 2 * len(sites) and all("/adapter/" in r for r in rules)
    else:
        assert rules == []
    assert not any("_delta" in p or "prompt" in p for p in flat)


def test_compacter_rule_is_one_array_whose_gradient_sums_all_layers():
    """Grad of the shared rule == sum of the grads of per-layer copies of it."""
    t5 = TINY.replace(num_layers=1, num_decoder_layers=1)
    shared_model = build_model(t5, get_method("compacter", **FIT))
    own_model = build_model(t5, get_method("compacter", shared_rule=False, **FIT))
    # Random O(0.1) values from numpy (no init compilation): every layer matters.
    rng = np.random.default_rng(1)
    flat_s = {p: jnp.asarray((p.endswith("scale")) + rng.normal(0, 0.1, s.shape), jnp.float32)
              for p, s in traverse_util.flatten_dict(jax.eval_shape(
                  init_fn(shared_model), jax.random.PRNGKey(1)), sep="/").items()}
    rule = flat_s["peft_root/phm_rule"]
    own_paths = traverse_util.flatten_dict(
        jax.eval_shape(init_fn(own_model), jax.random.PRNGKey(0)), sep="/")
    copies = [p for p in own_paths if p.endswith("phm_rule")]
    assert len(copies) == 8                # (1 enc + 1 dec block) x 2 adapters x (down, up)
    flat_o = {p: rule if p in copies else flat_s[p] for p in own_paths}
    assert set(flat_s) - set(flat_o) == {"peft_root/phm_rule"}

    x, dec = ids(), ids(seed=1)
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 5, TINY.vocab_size))

    def loss(model):
        return lambda p: jnp.sum(model.apply({"params": p}, x, jnp.ones_like(x), dec) * weights)

    params_s = traverse_util.unflatten_dict(flat_s, sep="/")
    params_o = traverse_util.unflatten_dict(flat_o, sep="/")
    (l_s, g_s), (l_o, g_o) = (jax.jit(jax.value_and_grad(loss(shared_model)))(params_s),
                              jax.jit(jax.value_and_grad(loss(own_model)))(params_o))
    np.testing.assert_allclose(l_s, l_o, rtol=1e-5)
    g_s, g_o = (traverse_util.flatten_dict(g, sep="/") for g in (g_s, g_o))
    per_layer = np.stack([np.asarray(g_o[p]) for p in copies])
    assert np.all(np.abs(per_layer).reshape(8, -1).max(axis=1) > 0)   # every layer contributes
    np.testing.assert_allclose(g_s["peft_root/phm_rule"], per_layer.sum(0), rtol=1e-4,
                               atol=1e-5 * np.abs(per_layer).max())
    # ... and not just any one of them.
    assert not np.allclose(g_s["peft_root/phm_rule"], per_layer[0], rtol=0.1)


def test_compacter_model_is_near_backbone_at_init():
    backbone = T5ForConditionalGeneration(TINY)
    model = build_model(TINY, get_method("compacter", **FIT))
    params = init_fn(model)(jax.random.PRNGKey(3))
    base = {k: v for k, v in params.items() if k != "peft_root"}
    base = traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(base).items()
                                         if "adapter" not in p})
    x, dec = ids(), ids(seed=1)
    ref = jax.jit(backbone.apply)({"params": base}, x, jnp.ones_like(x), dec)
    out = jax.jit(model.apply)({"params": params}, x, jnp.ones_like(x), dec)
    diff = float(jnp.abs(out - ref).max())
    assert 0.0 < diff < 1e-3 * float(jnp.abs(ref).max())


def test_scanned_layers():
    scanned = TINY.replace(scan_layers=True)
    flat = shapes(scanned, get_method("compacter++", **FIT))
    assert flat["encoder/blocks/layer_1/adapter/down/phm_left"].shape == (2, 4, 16, 1)
    assert flat["decoder/blocks/layer_2/adapter/up/phm_right"].shape == (2, 4, 1, 16)
    assert flat["peft_root/phm_rule"].shape == (4, 4, 4)          # not stacked: one rule
    with pytest.raises(ValueError, match="scan"):
        shapes(scanned, get_method("adapterdrop", drop_first=1, **FIT))
