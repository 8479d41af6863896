"""Flax NNX modules of the PEFT methods: the same math (`layer_math.py`), parameter names and
initialisation as the linen modules of `layers.py`, with eager shapes and `rngs`.

    from flax import nnx
    import compacter_jax as cj

    root = cj.nnx_layers.PeftRoot(4, rngs=nnx.Rngs(0))               # Compacter's shared rule
    adapter = cj.nnx_layers.Adapter(64, projection="lphm", shared_rule=root, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=cj.nnx_layers.AdapterParam)

Every parameter these modules create is an `AdapterParam` (a subclass of `nnx.Param`), so
`nnx.state(model, AdapterParam)`, `nnx.grad(..., argnums=nnx.DiffState(0, AdapterParam))` and
`nnx.Optimizer(model, tx, wrt=AdapterParam)` select exactly the method's parameters of a model
that also holds plain `nnx.Param` backbone weights (and no RNG state: the modules keep none).

Parameter names are those of the linen modules, so weights copy over by name:
`phm_rule`, `phm_left`, `phm_right`, `phm_factors`, `bias`, `lowrank_left`, `lowrank_right`,
`kernel`, `lora_a`, `lora_b`, `embedding`. A shared rule is held by reference (one `PeftRoot`
passed to every PHM layer); NNX stores it once, at the first path that reaches it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from compacter_jax.peft import layer_math, layers, phm

Array = jax.Array
Initializer = layers.Initializer


class AdapterParam(nnx.Param):
    """A parameter added by a PEFT method (trained); the backbone's stay plain `nnx.Param`."""


def _param(init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...]) -> AdapterParam:
    return AdapterParam(init(rngs.params(), shape, jnp.float32))


def _zeros(shape: tuple[int, ...]) -> AdapterParam:
    return AdapterParam(jnp.zeros(shape, jnp.float32))


class PeftRoot(nnx.Module):
    """Compacter's one PHM rule `phm_rule` [n, n, n] ~ N(0, rule_std), shared by reference.

    Calling it returns {"phm_rule": rule}, as the linen `PeftRoot`.
    """

    def __init__(self, n: int, *, rule_std: float = layers.SHARED_RULE_STD, rngs: nnx.Rngs):
        if n < 1:
            raise ValueError(f"PeftRoot: n must be >= 1, got {n}")
        self.n = n
        self.phm_rule = _param(jax.nn.initializers.normal(rule_std), rngs, (n, n, n))

    def __call__(self) -> dict[str, Array]:
        return {"phm_rule": self.phm_rule[...]}


class PHMLinear(nnx.Module):
    """y = x @ (sum_i A_i ⊗ B_i) + b.   x: [..., in_features] -> y: [..., out_features].

    rank=None: one full `phm_factors` [n, in/n, out/n]; rank=r: `phm_left` [n, in/n, r] and
    `phm_right` [n, r, out/n]. The rule A is the layer's own `phm_rule` [n, n, n] (~ rule_init)
    unless `shared_rule` (a `PeftRoot` with the same n) is given.
    """

    def __init__(self, in_features: int, out_features: int, *, n: int, rank: int | None = 1,
                 use_bias: bool = True, shared_rule: PeftRoot | None = None,
                 rule_init: Initializer = jax.nn.initializers.normal(layers.OWN_RULE_STD),
                 factor_init: Initializer = layers.phm_factor_init, path: phm.Path = "auto",
                 dtype: Any = None, rngs: nnx.Rngs):
        phm.check_phm_dims(in_features, out_features, n, rank)
        self.in_features, self.out_features, self.n, self.rank = in_features, out_features, n, rank
        self.path, self.dtype = path, dtype
        if shared_rule is not None:
            layer_math.check_shared_rule(shared_rule.phm_rule[...], n)
            self.shared_rule = shared_rule
        else:
            self.shared_rule = None
            self.phm_rule = _param(rule_init, rngs, (n, n, n))
        k, d = in_features // n, out_features // n
        if rank is None:
            self.phm_factors = _param(factor_init, rngs, (n, k, d))
        else:
            self.phm_left = _param(factor_init, rngs, (n, k, rank))
            self.phm_right = _param(factor_init, rngs, (n, rank, d))
        self.bias = _zeros((out_features,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        rule = (self.shared_rule.phm_rule if self.shared_rule is not None else self.phm_rule)[...]
        factors = (self.phm_factors[...] if self.rank is None
                   else (self.phm_left[...], self.phm_right[...]))
        bias = None if self.bias is None else self.bias[...]
        return layer_math.phm_linear(x, rule, factors, bias, path=self.path, dtype=self.dtype)


class LowRankLinear(nnx.Module):
    """y = (x @ s) @ t + b; `lowrank_left` s [in, rank], `lowrank_right` t [rank, out]."""

    def __init__(self, in_features: int, out_features: int, *, rank: int = 1,
                 use_bias: bool = True, kernel_init: Initializer = layers.lowrank_init,
                 dtype: Any = None, rngs: nnx.Rngs):
        layer_math.check_low_rank(rank, in_features, out_features)
        self.dtype = dtype
        self.lowrank_left = _param(kernel_init, rngs, (in_features, rank))
        self.lowrank_right = _param(kernel_init, rngs, (rank, out_features))
        self.bias = _zeros((out_features,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        bias = None if self.bias is None else self.bias[...]
        return layer_math.low_rank_linear(x, self.lowrank_left[...], self.lowrank_right[...],
                                          bias, dtype=self.dtype)


class Dense(nnx.Module):
    """y = x @ kernel + bias; `kernel` [in, out] ~ N(0, 0.01), `bias` zeros (the dense adapter's
    projection; an `nnx.Linear` whose parameters are `AdapterParam`s)."""

    def __init__(self, in_features: int, out_features: int, *,
                 kernel_init: Initializer = layers.dense_adapter_init, dtype: Any = None,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = _param(kernel_init, rngs, (in_features, out_features))
        self.bias = _zeros((out_features,))

    def __call__(self, x: Array) -> Array:
        return layer_math.affine(x, self.kernel[...], self.bias[...], dtype=self.dtype)


class Adapter(nnx.Module):
    """Bottleneck adapter with its own residual: h -> h + up(gelu_tanh(down(h))).

    h: [..., d_model] -> [..., d_model]; bottleneck = d_model // reduction_factor.
    projection: "dense", "lowrank", "phm" (full B, own rule) or "lphm" (Compacter). With
    `shared_rule` (a `PeftRoot`) both PHM projections use it (Compacter); else each owns a rule
    ~ N(0, own_rule_std).
    """

    def __init__(self, d_model: int, *, reduction_factor: int = 32,
                 projection: layers.Projection = "dense", n: int = 4, rank: int = 1,
                 shared_rule: PeftRoot | None = None, own_rule_std: float = layers.OWN_RULE_STD,
                 phm_path: phm.Path = "auto", dtype: Any = None, rngs: nnx.Rngs):
        if projection not in layers.PROJECTIONS:
            raise ValueError(f"Adapter projection must be one of {layers.PROJECTIONS}, "
                             f"got {projection!r}")
        if shared_rule is not None and projection not in ("phm", "lphm"):
            raise ValueError(f"Adapter: a shared_rule needs projection 'phm' or 'lphm', "
                             f"got {projection!r}")
        b = layer_math.bottleneck_size(d_model, reduction_factor)

        def proj(k: int, d: int) -> nnx.Module:
            if projection == "dense":
                return Dense(k, d, dtype=dtype, rngs=rngs)
            if projection == "lowrank":
                return LowRankLinear(k, d, rank=rank, dtype=dtype, rngs=rngs)
            return PHMLinear(k, d, n=n, rank=rank if projection == "lphm" else None,
                             shared_rule=shared_rule,
                             rule_init=jax.nn.initializers.normal(own_rule_std),
                             path=phm_path, dtype=dtype, rngs=rngs)

        self.down = proj(d_model, b)
        self.up = proj(b, d_model)

    def __call__(self, h: Array) -> Array:
        return layer_math.adapter_residual(h, self.down, self.up)


class LoRA(nnx.Module):
    """LoRA update (alpha / rank) * (x @ A) @ B, to be added to a frozen projection.

    x: [..., in_features] -> [..., out_features]; `lora_a` [in, rank] (kaiming-uniform),
    `lora_b` [rank, out] (zeros): the update is zero at init.
    """

    def __init__(self, in_features: int, out_features: int, *, rank: int = 8,
                 alpha: float = 16.0, dtype: Any = None, rngs: nnx.Rngs):
        if rank < 1:
            raise ValueError(f"LoRA: rank must be >= 1, got {rank}")
        self.alpha, self.dtype = alpha, dtype
        self.lora_a = _param(layers.lora_a_init, rngs, (in_features, rank))
        self.lora_b = _zeros((rank, out_features))

    def __call__(self, x: Array) -> Array:
        return layer_math.lora_delta(x, self.lora_a[...], self.lora_b[...], self.alpha,
                                     dtype=self.dtype)


class BitFitBias(nnx.Module):
    """A trainable `bias` [out_features] (zeros), broadcast to x's leading axes."""

    def __init__(self, out_features: int, *, dtype: Any = None, rngs: nnx.Rngs | None = None):
        self.dtype = dtype
        self.bias = _zeros((out_features,))

    def __call__(self, x: Array) -> Array:
        return layer_math.bitfit_bias(x, self.bias[...], dtype=self.dtype)


class SoftPrompt(nnx.Module):
    """`length` trainable vectors `embedding` [length, d_model] prepended to the input embeddings.

    (embeds [batch, len, d], mask [batch, len]) -> ([batch, length + len, d],
    [batch, length + len]); init_scheme "uniform" U(-r, r), "normal" N(0, r) or "vocab".
    """

    def __init__(self, length: int, d_model: int, *, init_scheme: str = "uniform",
                 init_range: float = 0.5, rngs: nnx.Rngs):
        init = layer_math.prompt_initializer(init_scheme, init_range)
        self.embedding = _param(init, rngs, (length, d_model))

    def __call__(self, embeds: Array, mask: Array) -> tuple[Array, Array]:
        return layer_math.prepend_prompt(self.embedding[...], embeds, mask)
