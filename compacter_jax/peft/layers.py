"""Flax linen modules of the PEFT methods: thin shells over `layer_math.py` (the math, shared
with the NNX modules of `nnx_layers.py`).

Parameter names and layouts (those of the original code): `phm_rule` [n, n, n], `phm_left` [n, in/n, r],
`phm_right` [n, r, out/n], `phm_factors` [n, in/n, out/n] (full B), `bias` [out];
`lowrank_left` [in, r], `lowrank_right` [r, out]; dense `kernel` [in, out] + `bias` [out];
`lora_a` [in, r], `lora_b` [r, out]; soft prompt `embedding` [length, d_model].

Initialisation (the original configs): an own PHM rule ~ Normal(0, 0.01) (the shared rule, created by
`PeftRoot`, ~ Normal(0, 1e-4)); PHM/low-rank factors ~ Glorot-uniform with gain sqrt(2) and
fans taken per i-slice; dense adapter kernels ~ Normal(0, 0.01); every bias zero.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax

from compacter_jax.peft import layer_math, phm
from compacter_jax.peft.layer_math import PROMPT_INITS  # noqa: F401  (re-exported)

Array = jax.Array
Initializer = Callable[..., Array]
Projection = Literal["dense", "lowrank", "phm", "lphm"]
PROJECTIONS: tuple[str, ...] = ("dense", "lowrank", "phm", "lphm")

SHARED_RULE_STD = 1e-4   # Compacter's one rule for the whole model
OWN_RULE_STD = 1e-2      # PHM-Adapter: one rule per PHM layer
# Glorot-uniform with gain sqrt(2); batch_axis=(0,) leaves the n axis out of the fans.
phm_factor_init: Initializer = nn.initializers.variance_scaling(
    2.0, "fan_avg", "uniform", batch_axis=(0,))
lowrank_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_avg", "uniform")
dense_adapter_init: Initializer = nn.initializers.normal(0.01)
# PyTorch's kaiming_uniform_(a=sqrt(5)) as used for LoRA's A: bound = 1/sqrt(fan_in).
lora_a_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class PHMLinear(nn.Module):
    """y = x @ (sum_i A_i ⊗ B_i) + b.   x: [..., in] -> y: [..., features_out].

    rank=None: B is one full parameter `phm_factors` [n, in/n, out/n] (PHM-Adapter);
    rank=r: B_i = s_i @ t_i with `phm_left` [n, in/n, r], `phm_right` [n, r, out/n] (LPHM).
    The rule A is the module's own `phm_rule` [n, n, n] unless `shared_rule` is passed.
    """

    features_out: int
    n: int
    rank: int | None = 1
    use_bias: bool = True
    rule_init: Initializer = nn.initializers.normal(OWN_RULE_STD)
    factor_init: Initializer = phm_factor_init
    path: phm.Path = "auto"
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, shared_rule: Array | None = None) -> Array:
        n, k, d = self.n, x.shape[-1], self.features_out
        phm.check_phm_dims(k, d, n, self.rank)
        if shared_rule is None:
            rule = self.param("phm_rule", self.rule_init, (n, n, n))
        else:
            layer_math.check_shared_rule(shared_rule, n)
            rule = shared_rule
        if self.rank is None:
            factors = self.param("phm_factors", self.factor_init, (n, k // n, d // n))
        else:
            factors = (self.param("phm_left", self.factor_init, (n, k // n, self.rank)),
                       self.param("phm_right", self.factor_init, (n, self.rank, d // n)))
        bias = self.param("bias", nn.initializers.zeros_init(), (d,)) if self.use_bias else None
        return layer_math.phm_linear(x, rule, factors, bias, path=self.path, dtype=self.dtype)


class LowRankLinear(nn.Module):
    """y = (x @ s) @ t + b with s: `lowrank_left` [in, rank], t: `lowrank_right` [rank, out].

    Adapter-LowRank's projection (rank 1): W = s t is never built.
    """

    features_out: int
    rank: int = 1
    use_bias: bool = True
    kernel_init: Initializer = lowrank_init
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k, d = x.shape[-1], self.features_out
        layer_math.check_low_rank(self.rank, k, d)
        left = self.param("lowrank_left", self.kernel_init, (k, self.rank))
        right = self.param("lowrank_right", self.kernel_init, (self.rank, d))
        bias = self.param("bias", nn.initializers.zeros_init(), (d,)) if self.use_bias else None
        return layer_math.low_rank_linear(x, left, right, bias, dtype=self.dtype)


class Adapter(nn.Module):
    """Bottleneck adapter with its own residual: h -> h + up(gelu_tanh(down(h))).

    h: [..., d_model] -> [..., d_model]. Bottleneck = d_model // reduction_factor.
    projection: "dense" (Houlsby/Pfeiffer/AdapterDrop), "lowrank" (rank-1 W = s t),
    "phm" (full B, own rule per layer), "lphm" (low-rank B; Compacter).
    With `use_shared_rule`, the PHM rule comes from `shared["phm_rule"]` (Compacter); else each
    PHM projection owns a rule ~ Normal(0, own_rule_std).
    """

    reduction_factor: int = 32
    projection: Projection = "dense"
    n: int = 4
    rank: int = 1
    use_shared_rule: bool = False
    own_rule_std: float = OWN_RULE_STD
    phm_path: phm.Path = "auto"
    dtype: Any = None

    def _projection(self, features: int, name: str) -> nn.Module:
        if self.projection == "dense":
            return nn.Dense(features, kernel_init=dense_adapter_init, dtype=self.dtype, name=name)
        if self.projection == "lowrank":
            return LowRankLinear(features, rank=self.rank, dtype=self.dtype, name=name)
        if self.projection in ("phm", "lphm"):
            return PHMLinear(features, n=self.n, rank=self.rank if self.projection == "lphm" else None,
                             rule_init=nn.initializers.normal(self.own_rule_std),
                             path=self.phm_path, dtype=self.dtype, name=name)
        raise AssertionError(self.projection)  # checked in __call__

    @nn.compact
    def __call__(self, h: Array, shared: Mapping[str, Array] | None = None) -> Array:
        if self.projection not in PROJECTIONS:
            raise ValueError(f"Adapter projection must be one of {PROJECTIONS}, "
                             f"got {self.projection!r}")
        d_model = h.shape[-1]
        bottleneck = layer_math.bottleneck_size(d_model, self.reduction_factor)
        down = self._projection(bottleneck, "down")
        up = self._projection(d_model, "up")
        if self.projection in ("phm", "lphm"):
            rule = None
            if self.use_shared_rule:
                if not shared or "phm_rule" not in shared:
                    raise ValueError("Adapter(use_shared_rule=True) needs shared['phm_rule'] "
                                     "from the root module (PeftRoot); none was passed")
                rule = shared["phm_rule"]
            return layer_math.adapter_residual(h, lambda x: down(x, rule), lambda x: up(x, rule))
        return layer_math.adapter_residual(h, down, up)


class PeftRoot(nn.Module):
    """Model-wide shared parameters: Compacter's one rule `phm_rule` [n, n, n] ~ N(0, 1e-4).

    Called with no arguments; returns {"phm_rule": rule}.
    """

    n: int
    rule_std: float = SHARED_RULE_STD

    @nn.compact
    def __call__(self) -> dict[str, Array]:
        rule = self.param("phm_rule", nn.initializers.normal(self.rule_std), (self.n,) * 3)
        return {"phm_rule": rule}


class LoRA(nn.Module):
    """LoRA update (alpha / rank) * (x @ A) @ B added to a frozen projection.

    x: [..., in] -> [..., features_out]. A = `lora_a` [in, rank] (kaiming-uniform),
    B = `lora_b` [rank, features_out] (zeros), so the delta is zero at init.
    """

    features_out: int
    rank: int = 8
    alpha: float = 16.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, shared: Any = None) -> Array:
        a = self.param("lora_a", lora_a_init, (x.shape[-1], self.rank))
        b = self.param("lora_b", nn.initializers.zeros_init(), (self.rank, self.features_out))
        return layer_math.lora_delta(x, a, b, self.alpha, dtype=self.dtype)


class BitFitBias(nn.Module):
    """A trainable bias `bias` [features_out] (zeros) added to a bias-free projection.

    x: [..., in] -> the bias broadcast to [..., features_out].
    """

    features_out: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, shared: Any = None) -> Array:
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features_out,))
        return layer_math.bitfit_bias(x, bias, dtype=self.dtype)


class SoftPrompt(nn.Module):
    """Prompt tuning: `length` trainable vectors `embedding` [length, d_model] prepended to the
    encoder input embeddings; the mask gets `length` ones in front.

    embeds: [batch, len, d_model], mask: [batch, len] -> ([batch, length + len, d_model],
    [batch, length + len]). init_scheme: "uniform" U(-init_range, init_range) (the original uses 0.5),
    "normal" N(0, init_range), or "vocab" (uniform here; `init_prompt_from_vocab` then copies
    token-embedding rows into it once the backbone is loaded).
    """

    length: int
    d_model: int
    init_scheme: str = "uniform"
    init_range: float = 0.5

    @nn.compact
    def __call__(self, embeds: Array, mask: Array) -> tuple[Array, Array]:
        init = layer_math.prompt_initializer(self.init_scheme, self.init_range)
        prompt = self.param("embedding", init, (self.length, self.d_model))
        return layer_math.prepend_prompt(prompt, embeds, mask)
