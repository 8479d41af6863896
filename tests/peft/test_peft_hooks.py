"""PeftHooks on a tiny Flax T5: where each method inserts what, Compacter's one shared rule,
identity at init, scanning, and loading a checkpoint with a method."""

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compacter_jax.models import T5ForConditionalGeneration, get_preset, save_pretrained
from compacter_jax.peft import (build_model, from_pretrained_with_method, get_method,
                                init_prompt_from_vocab)

TINY = get_preset("t5-tiny").replace(vocab_size=64)              # d_model 64, 2 + 2 blocks
# 12 + 12 blocks (AdapterDrop's "blocks 5-11"), only ever traced with eval_shape.
TINY12 = TINY.replace(d_model=32, d_ff=32, d_kv=8, num_layers=12, num_decoder_layers=12)
FIT = dict(reduction_factor=8)                                   # bottleneck 8 (n = 4 divides)
SUBLAYER = {("encoder", "self_attention"): "layer_0", ("encoder", "feed_forward"): "layer_1",
            ("decoder", "self_attention"): "layer_0", ("decoder", "feed_forward"): "layer_2"}


def _ids(b=2, t=5, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 1, TINY.vocab_size)


def _init_fn(model):
    ids = jnp.ones((1, 3), jnp.int32)
    return lambda rng: model.init(rng, ids, jnp.ones_like(ids), ids)["params"]


def _shapes(t5, peft):
    return traverse_util.flatten_dict(
        jax.eval_shape(_init_fn(build_model(t5, peft)), jax.random.PRNGKey(0)), sep="/")


def _adapter_sites(flat):
    return {tuple(p.split("/")[:3]) for p in flat if "/adapter/" in p}


def _expected_sites(t5, peft):
    out = set()
    for stack, n in (("encoder", t5.num_layers), ("decoder", t5.num_decoder_layers)):
        if stack not in peft.stacks:
            continue
        for i in range(n):
            if peft.block_has_adapter(i):
                out |= {(stack, f"block_{i}", SUBLAYER[stack, pos]) for pos in peft.positions}
    return out


@pytest.mark.parametrize("method,t5,overrides", [
    ("adapter", TINY, FIT), ("pfeiffer", TINY, FIT), ("lowrank", TINY, FIT),
    ("compacter", TINY, FIT), ("compacter++", TINY, FIT), ("phm_adapter", TINY, dict(n=8, **FIT)),
    ("adapterdrop", TINY12, dict(reduction_factor=4)),
    ("adapter", TINY12, dict(reduction_factor=4, blocks=(0, 11), stacks=("decoder",))),
])
def test_adapter_placement(method, t5, overrides):
    peft = get_method(method, **overrides)
    flat = _shapes(t5, peft)
    sites = _adapter_sites(flat)
    assert sites == _expected_sites(t5, peft)
    assert not any(s[2] == "layer_1" and s[0] == "decoder" for s in sites)   # no cross-attention
    if method == "adapterdrop":   # blocks 5..11 of each 12-block stack: 7 x 2 x 2 adapters
        assert len(sites) == 28 and min(int(s[1][6:]) for s in sites) == 5
    rules = [p for p in flat if p.endswith("phm_rule")]
    if peft.shared_rule:
        assert rules == ["peft_root/phm_rule"] and flat[rules[0]].shape == (4, 4, 4)
    elif peft.projection == "phm":   # one own rule per down / up projection
        assert len(rules) == 2 * len(sites) and all("/adapter/" in r for r in rules)
    else:
        assert rules == []
    assert not any("_delta" in p or "prompt" in p for p in flat)


def test_delta_and_prompt_placement():
    lora = _shapes(TINY, get_method("lora"))
    deltas = {p.rsplit("/", 1)[0] for p in lora if "_delta/" in p}
    expected = {f"{s}/block_{i}/{lay}/{att}/{q}_delta"
                for s, lay, att in (("encoder", "layer_0", "SelfAttention"),
                                    ("decoder", "layer_0", "SelfAttention"),
                                    ("decoder", "layer_1", "EncDecAttention"))
                for i in range(2) for q in ("q", "v")}
    assert deltas == expected
    assert lora["encoder/block_0/layer_0/SelfAttention/q_delta/lora_a"].shape == (64, 8)

    bitfit = _shapes(TINY, get_method("bitfit"))
    biases = {p: v.shape for p, v in bitfit.items() if "_delta/" in p}
    kernels = {p.replace("/kernel", "_delta/bias"): v.shape[1:] for p, v in bitfit.items()
               if p.endswith("/kernel")}      # every projection (T5-tiny has a tied lm_head)
    assert biases == {**kernels, "lm_head_delta/bias": (TINY.vocab_size,)}

    prompt = _shapes(TINY, get_method("prompt_tuning", prompt_length=7))
    assert [p for p in prompt if "prompt" in p] == ["encoder/prompt/embedding"]
    assert prompt["encoder/prompt/embedding"].shape == (7, 64)
    assert set(_shapes(TINY, get_method("full"))) == set(_shapes(TINY, get_method("lora",
                                                                                  lora_rank=0)))


def test_compacter_rule_is_one_array_whose_gradient_sums_all_layers():
    """Grad of the shared rule == sum of the grads of per-layer copies of it."""
    t5 = TINY.replace(num_layers=1, num_decoder_layers=1)
    shared_model = build_model(t5, get_method("compacter", **FIT))
    own_model = build_model(t5, get_method("compacter", shared_rule=False, **FIT))
    # Random O(0.1) values from numpy (no init compilation): every layer matters.
    rng = np.random.default_rng(1)
    flat_s = {p: jnp.asarray((p.endswith("scale")) + rng.normal(0, 0.1, s.shape), jnp.float32)
              for p, s in traverse_util.flatten_dict(jax.eval_shape(
                  _init_fn(shared_model), jax.random.PRNGKey(1)), sep="/").items()}
    rule = flat_s["peft_root/phm_rule"]
    own_paths = traverse_util.flatten_dict(
        jax.eval_shape(_init_fn(own_model), jax.random.PRNGKey(0)), sep="/")
    copies = [p for p in own_paths if p.endswith("phm_rule")]
    assert len(copies) == 8                # (1 enc + 1 dec block) x 2 adapters x (down, up)
    flat_o = {p: rule if p in copies else flat_s[p] for p in own_paths}
    assert set(flat_s) - set(flat_o) == {"peft_root/phm_rule"}

    ids, dec = _ids(), _ids(seed=1)
    weights = jax.random.normal(jax.random.PRNGKey(2), (2, 5, TINY.vocab_size))

    def loss(model):
        return lambda p: jnp.sum(model.apply({"params": p}, ids, jnp.ones_like(ids), dec)
                                 * weights)

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
    params = _init_fn(model)(jax.random.PRNGKey(3))
    base = {k: v for k, v in params.items() if k != "peft_root"}
    base = traverse_util.unflatten_dict({p: v for p, v in traverse_util.flatten_dict(base).items()
                                         if "adapter" not in p})
    ids, dec = _ids(), _ids(seed=1)
    ref = jax.jit(backbone.apply)({"params": base}, ids, jnp.ones_like(ids), dec)
    out = jax.jit(model.apply)({"params": params}, ids, jnp.ones_like(ids), dec)
    diff = float(jnp.abs(out - ref).max())
    assert 0.0 < diff < 1e-3 * float(jnp.abs(ref).max())


def test_scanned_layers():
    scanned = TINY.replace(scan_layers=True)
    flat = _shapes(scanned, get_method("compacter++", **FIT))
    assert flat["encoder/blocks/layer_1/adapter/down/phm_left"].shape == (2, 4, 16, 1)
    assert flat["decoder/blocks/layer_2/adapter/up/phm_right"].shape == (2, 4, 1, 16)
    assert flat["peft_root/phm_rule"].shape == (4, 4, 4)          # not stacked: one rule
    with pytest.raises(ValueError, match="scan"):
        _shapes(scanned, get_method("adapterdrop", drop_first=1, **FIT))


def test_from_pretrained_with_method(tmp_path):
    backbone = T5ForConditionalGeneration(TINY)
    base = _init_fn(backbone)(jax.random.PRNGKey(4))
    save_pretrained(tmp_path / "ckpt", TINY, base)
    model, params = from_pretrained_with_method(str(tmp_path / "ckpt"), "compacter++", **FIT)
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, value in traverse_util.flatten_dict(base, sep="/").items():
        np.testing.assert_array_equal(flat[path], value)        # backbone unchanged
    assert "peft_root/phm_rule" in flat and "encoder/block_0/layer_1/adapter/up/bias" in flat
    ids = _ids()
    logits = jax.jit(model.apply)({"params": params}, ids, jnp.ones_like(ids), ids)
    assert logits.shape == (2, 5, 64) and bool(jnp.all(jnp.isfinite(logits)))

    _, params = from_pretrained_with_method(str(tmp_path / "ckpt"), "prompt_tuning",
                                            prompt_length=3, prompt_init="vocab",
                                            prompt_vocab_ids=(5, 6, 9))
    np.testing.assert_array_equal(params["encoder"]["prompt"]["embedding"],
                                  base["shared"]["embedding"][np.array([5, 6, 9])])
    again = init_prompt_from_vocab(params)                      # default ids 0..length-1
    np.testing.assert_array_equal(again["encoder"]["prompt"]["embedding"],
                                  base["shared"]["embedding"][:3])
    with pytest.raises(ValueError, match="no soft prompt"):
        init_prompt_from_vocab(base)
