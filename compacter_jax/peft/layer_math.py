"""The math of the PEFT layers as pure functions, shared by the linen shells (`layers.py`) and the
NNX modules (`nnx_layers.py`): each framework only creates and stores the parameters.

Shapes: x [..., in] -> [..., out]; parameter layouts as in `layers.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from compacter_jax.peft import phm

Array = jax.Array
Initializer = Callable[..., Array]
PROMPT_INITS = ("uniform", "normal", "vocab")


def check_shared_rule(rule: Array, n: int) -> None:
    """Raises ValueError unless a shared PHM rule has shape [n, n, n]."""
    if tuple(rule.shape) != (n, n, n):
        raise ValueError(f"shared PHM rule has shape {tuple(rule.shape)}, this layer "
                         f"needs [n, n, n] = {(n, n, n)}")


def phm_linear(x: Array, rule: Array, factors: phm.Factors, bias: Array | None = None, *,
               path: phm.Path = "auto", dtype: Any = None) -> Array:
    """y = x @ (sum_i rule[i] ⊗ B_i) + bias, computed in `dtype` (None: promoted from inputs).

    factors: B [n, in/n, out/n] or (left [n, in/n, r], right [n, r, out/n]); bias [out] or None.
    """
    if isinstance(factors, (tuple, list)):
        x, rule, left, right = promote_dtype(x, rule, *factors, dtype=dtype)
        factors = (left, right)
    else:
        x, rule, factors = promote_dtype(x, rule, factors, dtype=dtype)
    y = phm.phm_matmul(x, rule, factors, path=path)
    return y if bias is None else y + jnp.asarray(bias, y.dtype)


def low_rank_linear(x: Array, left: Array, right: Array, bias: Array | None = None, *,
                    dtype: Any = None) -> Array:
    """y = (x @ left) @ right + bias; left [in, r], right [r, out]: W = left @ right never built."""
    x, left, right = promote_dtype(x, left, right, dtype=dtype)
    y = (x @ left) @ right
    return y if bias is None else y + jnp.asarray(bias, y.dtype)


def check_low_rank(rank: int, in_features: int, out_features: int) -> None:
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(f"LowRankLinear: rank={rank} must be in [1, min(in, out)] = "
                         f"[1, {min(in_features, out_features)}]; lower `rank`")


def affine(x: Array, kernel: Array, bias: Array | None = None, *, dtype: Any = None) -> Array:
    """y = x @ kernel + bias; kernel [in, out] (the dense adapter projection, as `nn.Dense`)."""
    if bias is None:
        x, kernel = promote_dtype(x, kernel, dtype=dtype)
        return x @ kernel
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    return x @ kernel + bias


def bottleneck_size(d_model: int, reduction_factor: int) -> int:
    """d_model // reduction_factor, or ValueError when that leaves nothing."""
    size = d_model // reduction_factor
    if size < 1:
        raise ValueError(f"Adapter: reduction_factor={reduction_factor} leaves no "
                         f"bottleneck for d_model={d_model}; lower reduction_factor")
    return size


def adapter_residual(h: Array, down: Callable[[Array], Array], up: Callable[[Array], Array]
                     ) -> Array:
    """h + up(gelu_tanh(down(h))), in h's dtype: the bottleneck adapter with its own residual."""
    return h + up(jax.nn.gelu(down(h), approximate=True)).astype(h.dtype)


def lora_delta(x: Array, a: Array, b: Array, alpha: float, *, dtype: Any = None) -> Array:
    """(alpha / rank) * (x @ a) @ b; a [in, rank], b [rank, out]."""
    x, a, b = promote_dtype(x, a, b, dtype=dtype)
    return (x @ a) @ b * jnp.asarray(alpha / a.shape[-1], x.dtype)


def bitfit_bias(x: Array, bias: Array, *, dtype: Any = None) -> Array:
    """The bias [out] broadcast to x's leading axes: [..., out]."""
    dtype = dtype or jnp.result_type(x, bias)
    return jnp.broadcast_to(bias.astype(dtype), (*x.shape[:-1], bias.shape[-1]))


def prompt_initializer(init_scheme: str, init_range: float) -> Initializer:
    """The soft prompt's initializer: "uniform"/"vocab" U(-r, r), "normal" N(0, r)."""
    if init_scheme == "normal":
        return jax.nn.initializers.normal(init_range)
    if init_scheme in ("uniform", "vocab"):
        r = init_range
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(  # noqa: E731
            key, shape, dtype, -r, r)
    raise ValueError(f"SoftPrompt init_scheme must be one of {PROMPT_INITS}, got {init_scheme!r}")


def prepend_prompt(prompt: Array, embeds: Array, mask: Array) -> tuple[Array, Array]:
    """prompt [length, d], embeds [batch, len, d], mask [batch, len] ->
    ([batch, length + len, d], [batch, length + len]) with ones in front of the mask."""
    batch, (length, d_model) = embeds.shape[0], prompt.shape
    prompt = jnp.broadcast_to(prompt.astype(embeds.dtype), (batch, length, d_model))
    ones = jnp.ones((batch, length), mask.dtype)
    return jnp.concatenate([prompt, embeds], axis=1), jnp.concatenate([ones, mask], axis=1)
