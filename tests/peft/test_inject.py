"""`inject`: a method's modules added to models by path rules. Compacter++ injected into our T5
by rule = the hook T5 (same weights); linen and NNX models the library does not know train
(loss down, frozen weights bit-identical) and save/reload."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

import compacter_jax as cj
from compacter_jax.models import T5ForConditionalGeneration
from compacter_jax.peft import nnx_layers
from compacter_jax.peft.export import AdapterFileError

KEY = jax.random.PRNGKey(0)


def test_rule_injected_t5_equals_hook_t5():
    method = cj.get_method("compacter++", reduction_factor=8)
    config = cj.get_preset("t5-tiny")
    hook_model = cj.build_model(config, method)
    ids = jnp.array([[5, 6, 7, 1], [8, 9, 1, 0]])
    dec = cj.shift_right(ids)
    args = (ids, (ids > 0).astype(jnp.int32), dec, jnp.ones_like(dec))
    hook_params = jax.jit(hook_model.init)(KEY, *args)["params"]
    # A rule of unit scale (not the 1e-4 init) so the adapters move the logits visibly.
    hook_params = {**hook_params, "peft_root": {
        "phm_rule": jax.random.normal(jax.random.PRNGKey(3), (4, 4, 4))}}
    model, inj = cj.inject(T5ForConditionalGeneration(config), method,
                           where=r"DenseReluDense$", also_train=r"layer_norm")
    # Hook layout .../layer_k/adapter/... -> rule layout .../layer_k/DenseReluDense/adapter/...
    flat = {}
    for path, v in traverse_util.flatten_dict(hook_params).items():
        if "adapter" in path:
            i = path.index("adapter")
            path = (*path[:i], "DenseReluDense", *path[i:])
        flat[path] = v
    params = traverse_util.unflatten_dict(flat)   # a missing name would fail in apply
    want = jax.jit(hook_model.apply)({"params": hook_params}, *args)
    apply = jax.jit(model.apply)
    got = apply({"params": params}, *args)
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) <= 1e-6 * scale
    # The adapters matter: with a zero rule (W = 0, zero biases) they are the identity.
    zero_rule = {**params, "peft_root": {"phm_rule": jnp.zeros((4, 4, 4))}}
    assert float(jnp.abs(apply({"params": zero_rule}, *args) - want).max()) > 1e-3 * scale
    # Same trainable set as the method's (adapters + shared rule + layer norms).
    trainable, _ = inj.partition(params)
    assert cj.count(trainable) == method.trainable_count(hook_params)


class _Block(nn.Module):
    d: int

    @nn.compact
    def __call__(self, h):
        q = nn.Dense(self.d, name="q")(h)
        k = nn.Dense(self.d, name="k")(h)
        att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(self.d), axis=-1)
        h = h + att @ nn.Dense(self.d, name="v")(h)
        mlp = nn.Sequential([nn.Dense(2 * self.d), nn.gelu, nn.Dense(self.d)], name="mlp")
        return h + mlp(nn.LayerNorm(name="ln")(h))


class _TinyLM(nn.Module):
    """A linen model the library knows nothing of."""
    vocab: int = 32
    d: int = 16

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.d, name="embed")(ids)
        for i in range(2):
            h = _Block(self.d, name=f"block_{i}")(h)
        return nn.Dense(self.vocab, name="head")(h)


def _lm_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@pytest.mark.parametrize("method,where,count", [
    ("compacter++", r"block_\d+/mlp$", 4 ** 3 + 2 * ((4 * 4 + 4 * 2 + 8) + (4 * 2 + 4 * 4 + 16))),
    pytest.param("lora", r"/(q|v)$", 4 * (16 * 8 + 8 * 16), marks=pytest.mark.long),
])
def test_inject_into_unknown_linen_model_trains_and_reloads(tmp_path, method, where, count):
    ids = jax.random.randint(KEY, (4, 8), 0, 32)
    backbone = jax.jit(_TinyLM().init)(KEY, ids)["params"]
    overrides = {"reduction_factor": 2} if method == "compacter++" else {}
    model, inj = cj.inject(_TinyLM(), method, where=where, **overrides)
    init = jax.jit(lambda key: inj.init(key, ids, backbone=backbone))
    apply = jax.jit(model.apply)
    params = init(jax.random.PRNGKey(1))
    trainable, frozen = inj.partition(params)
    assert cj.count(trainable) == count
    np.testing.assert_array_equal(frozen["embed"]["embedding"], backbone["embed"]["embedding"])
    tx = optax.adam(3e-2)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, g = jax.value_and_grad(
            lambda t: _lm_loss(apply({"params": inj.combine(t, frozen)}, ids), ids))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(4):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    trained = inj.combine(trainable, frozen)
    jax.tree.map(np.testing.assert_array_equal, inj.partition(trained)[1],
                 inj.partition(params)[1])                    # frozen bit-identical
    inj.save(tmp_path / "a", trained, model="tiny-lm")
    fresh = init(jax.random.PRNGKey(2))
    reloaded = inj.load(tmp_path / "a", fresh)
    np.testing.assert_array_equal(apply({"params": reloaded}, ids), apply({"params": trained}, ids))
    other = cj.inject(_TinyLM(), "compacter", where=where, reduction_factor=2)[1]
    with pytest.raises(AdapterFileError, match="saved with method"):
        other.load(tmp_path / "a", fresh)


def test_inject_errors_name_the_fix():
    with pytest.raises(ValueError, match="supports the adapter family and LoRA"):
        cj.inject(_TinyLM(), "bitfit", where="mlp")
    with pytest.raises(ValueError, match="not a valid regex"):
        cj.inject(_TinyLM(), "lora", where="(")
    ids = jnp.zeros((1, 4), jnp.int32)
    _, inj = cj.inject(_TinyLM(), "lora", where=r"/q$")
    backbone = jax.eval_shape(_TinyLM().init, KEY, ids)["params"]
    with pytest.raises(ValueError, match=r"missing \['head/bias'"):
        jax.eval_shape(lambda: inj.init(KEY, ids, backbone={
            k: v for k, v in backbone.items() if k != "head"}))
    with pytest.raises(ValueError, match="rule_groups needs a method with a shared PHM rule"):
        cj.inject(_TinyLM(), "lora", where="q", rule_groups={"a": "block_0"})
    # linen rule groups: one rule per group at peft_root_<group>, trained
    _, inj = cj.inject(_TinyLM(), "compacter++", where=r"mlp$", reduction_factor=2,
                       rule_groups={"lo": r"block_0/", "hi": r"block_1/"})
    params = jax.eval_shape(lambda: inj.init(KEY, ids))
    assert {"peft_root_lo", "peft_root_hi"} <= set(params) and "peft_root" not in params
    assert inj.is_trainable(("peft_root_hi", "phm_rule"))
    _, inj = cj.inject(_TinyLM(), "compacter++", where=r"mlp$", reduction_factor=2,
                       rule_groups={"lo": r"block_0/"})
    with pytest.raises(ValueError, match=r"'block_1/mlp' matches rule groups \[\]"):
        jax.eval_shape(lambda: inj.init(KEY, ids))


# -- NNX -------------------------------------------------------------------------------------
class _MLP(nnx.Module):
    def __init__(self, d, rngs):
        self.fc1 = nnx.Linear(d, 2 * d, rngs=rngs)
        self.fc2 = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, h):
        return self.fc2(nnx.gelu(self.fc1(h)))


class _NNXBlock(nnx.Module):
    def __init__(self, d, rngs):
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.mlp = _MLP(d, rngs)

    def __call__(self, h):
        t = h.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))
        y = self.ln(h)
        att = jnp.where(causal, self.q(y) @ jnp.swapaxes(y, -1, -2), -1e9)
        h = h + jax.nn.softmax(att, axis=-1) @ self.v(y)
        return h + self.mlp(self.ln(h))


class _NNXDecoder(nnx.Module):
    """A small decoder-only LM written in NNX."""

    def __init__(self, vocab=32, d=16, layers=2, *, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([_NNXBlock(d, rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.parametrize("method,where", [
    ("compacter++", r"blocks/\d+/mlp$"),
    pytest.param("lora", r"blocks/\d+/(q|v)$", marks=pytest.mark.long)])
def test_inject_into_nnx_decoder_trains_and_reloads(tmp_path, method, where):
    ids = jax.random.randint(KEY, (4, 8), 0, 32)
    forward = nnx.jit(lambda m: m(ids))
    model = _NNXDecoder(rngs=nnx.Rngs(0))
    before = forward(model) if method == "lora" else None
    overrides = {"reduction_factor": 2} if method == "compacter++" else {}
    model, inj = cj.inject(model, method, where=where, rngs=nnx.Rngs(1), features=16,
                           **overrides)
    if method == "lora":   # LoRA's B starts at zero: the injected model is the backbone
        np.testing.assert_array_equal(forward(model), before)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx_layers.AdapterParam))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, frozen))
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx_layers.AdapterParam)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(lambda m: _lm_loss(m(ids), ids),
                                     argnums=nnx.DiffState(0, nnx_layers.AdapterParam))(model)
        opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(4)]
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, nnx.state(model, frozen)), frozen_before)
    inj.save(tmp_path / "a", model)
    fresh, _ = cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), method, where=where, rngs=nnx.Rngs(7),
                         features=16, **overrides)
    trained = forward(model)
    assert not np.array_equal(forward(fresh), trained)
    inj.load(tmp_path / "a", fresh)
    np.testing.assert_array_equal(forward(fresh), trained)


def test_nnx_inject_errors_and_rule_groups():
    with pytest.raises(ValueError, match="pass features=<d_model>"):
        cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), "compacter++", where=r"mlp$",
                  rngs=nnx.Rngs(1), reduction_factor=2)
    with pytest.raises(ValueError, match="no module of _NNXDecoder matches"):
        cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), "lora", where=r"attention", rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="LoRA needs a projection with in_features"):
        cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), "lora", where=r"mlp$", rngs=nnx.Rngs(1))
    model, _ = cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), "compacter++", where=r"mlp$",
                         rngs=nnx.Rngs(1), features=16, reduction_factor=2,
                         rule_groups={"low": r"blocks/0/", "high": r"blocks/1/"})
    r0 = model.blocks[0].mlp.adapter.down.shared_rule
    r1 = model.blocks[1].mlp.adapter.down.shared_rule
    assert r0 is not r1 and r0 is model.blocks[0].mlp.adapter.up.shared_rule


def test_lora_injection_places_and_counts_without_running():
    """The fast LoRA check (training + reload are long tests): where it goes, what it trains."""
    ids = jnp.zeros((1, 4), jnp.int32)
    _, inj = cj.inject(_TinyLM(), "lora", where=r"/(q|v)$", rank=4)
    params = jax.eval_shape(lambda: inj.init(KEY, ids))
    trainable, _ = inj.partition(params)
    assert sorted(traverse_util.flatten_dict(trainable)) == [
        (f"block_{i}", p, "lora", w) for i in range(2) for p in ("q", "v")
        for w in ("lora_a", "lora_b")]
    model, _ = cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), "lora", where=r"/(q|v)$", rank=4,
                         rngs=nnx.Rngs(1))
    assert type(model.blocks[1].v).__name__ == "LoRABeside"
    assert type(model.blocks[1].v.base) is nnx.Linear
    selected = jax.tree.leaves(nnx.state(model, nnx_layers.AdapterParam))
    assert sum(v.size for v in selected) == 2 * 2 * (16 * 4 + 4 * 16)


def test_nnx_also_train_makes_matching_backbone_params_adapter_params():
    model, _ = cj.inject(_NNXDecoder(rngs=nnx.Rngs(0)), "lora", where=r"/q$", rank=2,
                         also_train=r"/ln/", rngs=nnx.Rngs(1))
    selected = nnx.state(model, nnx_layers.AdapterParam)
    paths = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(selected))
    assert paths == sorted([f"blocks/{i}/ln/{w}" for i in range(2) for w in ("bias", "scale")]
                           + [f"blocks/{i}/q/lora/lora_{w}" for i in range(2) for w in "ab"])
    assert isinstance(model.blocks[0].ln.scale, nnx_layers.AdapterParam)
    assert type(model.head.kernel) is nnx.Param
