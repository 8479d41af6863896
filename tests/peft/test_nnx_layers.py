"""NNX modules: the same numbers as the linen modules on the same weights; AdapterParam selects
exactly the method's parameters (optimizer, state), RNG-free."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from compacter_jax.peft import layers, nnx_layers

KEY = jax.random.PRNGKey(0)
EPS32 = float(jnp.finfo(jnp.float32).eps)


def _close(a, b, n_terms):
    """Float32 equality for sums of ~n_terms products (same math, possibly reordered)."""
    a, b = np.asarray(a), np.asarray(b)
    tol = 8 * EPS32 * np.sqrt(n_terms) * max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def _copy_into(module, params, rule=None):
    """Linen `params` (nested dict, same names) into the NNX module's AdapterParams; a shared
    rule (the linen call argument) into any `shared_rule/phm_rule`."""
    for path, var in nnx.iter_graph(module):
        if not isinstance(var, nnx_layers.AdapterParam):
            continue
        if path[-2:] == ("shared_rule", "phm_rule"):
            var[...] = rule
            continue
        node = params
        for key in path:
            node = node[key]
        assert var[...].shape == node.shape, path
        var[...] = node


def _n_params(module):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("rank", [2, pytest.param(None, marks=pytest.mark.long)])
def test_phm_linear_equals_linen(rank):
    x = jax.random.normal(KEY, (3, 5, 16))
    lin = layers.PHMLinear(8, n=4, rank=rank)
    params = lin.init(jax.random.PRNGKey(1), x)["params"]
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(KEY, v.shape), params)  # bias != 0
    mod = nnx_layers.PHMLinear(16, 8, n=4, rank=rank, rngs=nnx.Rngs(2))
    assert _n_params(mod) == sum(v.size for v in jax.tree.leaves(params))
    _copy_into(mod, params)
    _close(mod(x), lin.apply({"params": params}, x), 16)


def test_phm_linear_shared_rule_equals_linen_and_is_one_parameter():
    x = jax.random.normal(KEY, (4, 12))
    root = nnx_layers.PeftRoot(3, rngs=nnx.Rngs(0))
    root.phm_rule[...] = jax.random.normal(KEY, (3, 3, 3))
    mod = nnx_layers.PHMLinear(12, 6, n=3, rank=1, shared_rule=root, rngs=nnx.Rngs(1))
    assert not hasattr(mod, "phm_rule")
    lin = layers.PHMLinear(6, n=3, rank=1)
    params = lin.init(KEY, x, root.phm_rule[...])["params"]
    _copy_into(mod, params, root.phm_rule[...])
    _close(mod(x), lin.apply({"params": params}, x, root.phm_rule[...]), 12)
    with pytest.raises(ValueError, match=r"shared PHM rule has shape \(3, 3, 3\)"):
        nnx_layers.PHMLinear(16, 8, n=4, shared_rule=root, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="in_features=10 is not divisible by n=4"):
        nnx_layers.PHMLinear(10, 8, n=4, rngs=nnx.Rngs(1))


# lphm-shared runs by default (Compacter's path); the others are the same code with other
# projections (their layers are compared one by one above and below).
@pytest.mark.parametrize("projection", ["lphm-shared", *(
    pytest.param(p, marks=pytest.mark.long) for p in ("dense", "lowrank", "phm"))])
def test_adapter_equals_linen(projection):
    shared = projection.endswith("-shared")
    projection = projection.removesuffix("-shared")
    h = jax.random.normal(KEY, (2, 3, 32))
    rule = jax.random.normal(jax.random.PRNGKey(5), (4, 4, 4)) if shared else None
    lin = layers.Adapter(reduction_factor=4, projection=projection, n=4, rank=1,
                         use_shared_rule=shared)
    arg = {"phm_rule": rule} if shared else None
    params = lin.init(jax.random.PRNGKey(1), h, arg)["params"]
    params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(KEY, v.shape), params)
    root = nnx_layers.PeftRoot(4, rngs=nnx.Rngs(0)) if shared else None
    mod = nnx_layers.Adapter(32, reduction_factor=4, projection=projection, n=4, rank=1,
                             shared_rule=root, rngs=nnx.Rngs(3))
    _copy_into(mod, params, rule)
    want = lin.apply({"params": params}, h, arg)
    assert float(jnp.abs(want - h).max()) > 1e-3          # the adapter does something
    _close(mod(h), want, 32)


def test_lora_bitfit_lowrank_prompt_equal_linen():
    x = jax.random.normal(KEY, (2, 5, 12))
    for lin, mod, args in (
            (layers.LoRA(6, rank=3, alpha=4.0),
             nnx_layers.LoRA(12, 6, rank=3, alpha=4.0, rngs=nnx.Rngs(0)), (x,)),
            (layers.BitFitBias(6), nnx_layers.BitFitBias(6), (x,)),
            (layers.LowRankLinear(6, rank=2),
             nnx_layers.LowRankLinear(12, 6, rank=2, rngs=nnx.Rngs(0)), (x,)),
            (layers.SoftPrompt(3, 12), nnx_layers.SoftPrompt(3, 12, rngs=nnx.Rngs(0)),
             (x, jnp.ones((2, 5), jnp.int32)))):
        params = lin.init(jax.random.PRNGKey(1), *args)["params"]
        params = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(KEY, v.shape), params)
        _copy_into(mod, params)
        want = lin.apply({"params": params}, *args)
        jax.tree.map(lambda a, b: _close(a, b, 12), mod(*args), want)


def test_inits_follow_the_linen_distributions():
    mod = nnx_layers.PHMLinear(4096, 256, n=4, rank=1, rngs=nnx.Rngs(0))
    bound = np.sqrt(12.0 / (1024 + 1))     # Glorot-uniform, gain sqrt(2), fans per i-slice
    assert 0.9 * bound < float(jnp.abs(mod.phm_left[...]).max()) <= bound
    assert 0.005 < float(jnp.std(mod.phm_rule[...])) < 0.02
    assert float(jnp.abs(mod.bias[...]).max()) == 0.0
    root = nnx_layers.PeftRoot(8, rngs=nnx.Rngs(0))
    assert 5e-5 < float(jnp.std(root.phm_rule[...])) < 2e-4
    lora = nnx_layers.LoRA(64, 32, rank=4, rngs=nnx.Rngs(0))
    assert float(jnp.abs(lora.lora_b[...]).max()) == 0.0
    assert float(jnp.abs(lora.lora_a[...]).max()) <= 1 / np.sqrt(64)


class _Net(nnx.Module):
    """A frozen backbone (plain nnx.Param) with a Compacter adapter (AdapterParam)."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(16, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)        # holds an RNG key: must not be selected
        self.root = nnx_layers.PeftRoot(4, rngs=rngs)
        self.a1 = nnx_layers.Adapter(16, reduction_factor=2, projection="lphm",
                                     shared_rule=self.root, rngs=rngs)
        self.a2 = nnx_layers.Adapter(16, reduction_factor=2, projection="lphm",
                                     shared_rule=self.root, rngs=rngs)

    def __call__(self, x):
        return self.a2(self.a1(jnp.tanh(self.lin(x))))


def test_optimizer_wrt_adapter_param_trains_only_adapter_params():
    model = _Net(nnx.Rngs(0))
    model.eval()
    selected = nnx.state(model, nnx_layers.AdapterParam)
    leaves = jax.tree.leaves(selected)
    assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in leaves)   # no RNG keys
    # rule once + 2 adapters x (down: left 4*8*1, right 4*1*2, bias 8; up: 4*8*1... )
    expected = 4 ** 3 + 2 * ((4 * 4 * 1 + 4 * 1 * 2 + 8) + (4 * 2 * 1 + 4 * 1 * 4 + 16))
    assert sum(v.size for v in leaves) == expected
    frozen = nnx.All(nnx.Param, nnx.Not(nnx_layers.AdapterParam))
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, frozen))
    adapter_before = jax.tree.map(np.asarray, selected)
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx_layers.AdapterParam)
    x = jax.random.normal(KEY, (8, 16))
    y = jax.random.normal(jax.random.PRNGKey(1), (8, 16))

    @nnx.jit
    def step(model, opt):
        loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(
            loss_fn, argnums=nnx.DiffState(0, nnx_layers.AdapterParam))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(5)]
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(np.asarray, nnx.state(model, frozen)),
                 frozen_before)
    changed = jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(np.any(np.asarray(a) != b)),
        nnx.state(model, nnx_layers.AdapterParam), adapter_before))
    assert all(changed)          # every adapter parameter (the shared rule too) moved
