"""T5 building blocks: RMS layer norm, hooked projections, the feed-forward sublayer.

Every helper here is called inside an `@nn.compact` method: the modules it creates become
children of the caller, under the parameter names HF uses (`layer_norm`, `q`, `wi_0`, ...),
and the PEFT modules the hooks return sit beside them (`models/hooks.py`). Kernels are
[in, out].
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from compacter_jax.models.config import T5Config
from compacter_jax.models.hooks import Site, T5Hooks

Array = jax.Array


def normal(std: float) -> nn.initializers.Initializer:
    """N(0, std^2) initializer (T5's init scales: Mesh-TF's `d ** -0.5` and friends)."""
    return nn.initializers.normal(stddev=std)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias; statistics in float32. [..., d] -> [..., d] compute dtype."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), cfg.params_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)
        return (scale.astype(jnp.float32) * y).astype(cfg.compute_dtype)


def project(x: Array, proj: str, out_features: int, std: float, cfg: T5Config, hooks: T5Hooks,
            site: Site, shared) -> Array:
    """x @ kernel (named `proj`) plus the hook's delta `{proj}_delta`, if any. Call in compact."""
    y = nn.Dense(out_features, use_bias=False, dtype=cfg.compute_dtype,
                 param_dtype=cfg.params_dtype, kernel_init=normal(std), name=proj)(x)
    delta = hooks.projection_delta(site, proj, x.shape[-1], out_features, name=f"{proj}_delta")
    if delta is not None:
        y = y + delta(x, shared).astype(y.dtype)
    return y


def layer_norm(h: Array, cfg: T5Config, hooks: T5Hooks, site: Site, shared) -> Array:
    """The sublayer's pre-norm `layer_norm` plus the hook's delta, if any. Call in compact."""
    y = T5LayerNorm(cfg, name="layer_norm")(h)
    delta = hooks.layer_norm_delta(site, cfg.d_model, name="layer_norm_delta")
    if delta is not None:
        y = y + delta(y, shared).astype(y.dtype)
    return y


def adapter_dropout_residual(h: Array, y: Array, cfg: T5Config, hooks: T5Hooks, site: Site,
                             shared, deterministic: bool) -> Array:
    """h + Dropout(adapter(y)): the adapter sits on the sublayer output. Call in compact."""
    adapter = hooks.sublayer_adapter(site, cfg.d_model, name="adapter")
    if adapter is not None:
        y = adapter(y, shared).astype(y.dtype)
    return h + nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class T5DenseReluDense(nn.Module):
    """wo(dropout(act(wi x))) or, gated, wo(dropout(gelu_tanh(wi_0 x) * wi_1 x))."""

    config: T5Config
    hooks: T5Hooks
    site: Site
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array, shared) -> Array:
        cfg = self.config
        proj = functools.partial(project, cfg=cfg, hooks=self.hooks, site=self.site,
                                 shared=shared)
        std_in = cfg.d_model ** -0.5
        if cfg.is_gated:
            y = (jax.nn.gelu(proj(x, "wi_0", cfg.d_ff, std_in), approximate=True)
                 * proj(x, "wi_1", cfg.d_ff, std_in))
        else:
            y = jax.nn.relu(proj(x, "wi", cfg.d_ff, std_in))
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
        return proj(y, "wo", cfg.d_model, cfg.d_ff ** -0.5)


class T5LayerFF(nn.Module):
    """Pre-norm feed-forward sublayer: h + Dropout(adapter(DenseReluDense(LayerNorm(h))))."""

    config: T5Config
    hooks: T5Hooks
    site: Site
    deterministic: bool = True

    @nn.compact
    def __call__(self, h: Array, shared) -> Array:
        y = layer_norm(h, self.config, self.hooks, self.site, shared)
        y = T5DenseReluDense(self.config, self.hooks, self.site, self.deterministic,
                             name="DenseReluDense")(y, shared)
        return adapter_dropout_residual(h, y, self.config, self.hooks, self.site, shared,
                                        self.deterministic)
