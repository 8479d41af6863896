"""Dropout masks that depend on an example's row in the *global* batch, not on the device.

`jax.random` draws a mask from a key and a shape. Under `jit` the model sees the global batch
`[B, ...]`; under `pmap` each device sees its `[B / n, ...]` shard, so one key per step gives
different masks (and a different loss) on n devices. `row_keyed_dropout(rows)` makes every
`flax.linen.Dropout` in the model draw row r's mask from `fold_in(layer_key, rows[r])`, where
`rows` are the global row indices of the local batch: 1 device, `jit` over n devices and `pmap`
over n devices then draw bit-identical masks, packed rows included (a packed row is one row).
Only the mask draw is per row (a vmap over `jax.random.bernoulli`), not the model, so it costs
what one key per step costs.

It intercepts `flax.linen.Dropout.__call__` (`nn.intercept_methods`); models whose dropout is
something else (NNX modules, hand-written masks) keep their own key use and need
`make_train_step(per_example_dropout=True)` for pmap to equal jit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp


def _row_dropout(module: nn.Dropout, rows: jax.Array, inputs: jax.Array,
                 deterministic: bool | None = None, rng: jax.Array | None = None) -> jax.Array:
    """`nn.Dropout.__call__` with one mask key per global row (same semantics otherwise)."""
    deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
    if module.rate == 0.0 or deterministic:
        return inputs
    if module.rate == 1.0:  # as flax: no NaN gradients from 0 / 0
        return jnp.zeros_like(inputs)
    broadcast = {d % inputs.ndim for d in module.broadcast_dims} if inputs.ndim else set()
    if inputs.ndim == 0 or inputs.shape[0] != rows.shape[0] or 0 in broadcast:
        raise ValueError(
            f"row-keyed dropout in {'/'.join(module.path) or 'a Dropout'}: inputs of shape "
            f"{tuple(inputs.shape)} (broadcast_dims={tuple(module.broadcast_dims)}) do not have "
            f"the {rows.shape[0]} batch rows on axis 0; use make_train_step(..., "
            "per_example_dropout=True) for this model")
    keep = 1.0 - module.rate
    if rng is None:
        rng = module.make_rng(module.rng_collection)
    row_shape = tuple(1 if d in broadcast else s for d, s in enumerate(inputs.shape))[1:]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows)
    mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, row_shape))(keys)
    mask = jnp.broadcast_to(mask, inputs.shape)
    return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


@contextlib.contextmanager
def row_keyed_dropout(rows: jax.Array) -> Iterator[None]:
    """Within the block, every `nn.Dropout` call draws its mask per row of the global batch.

    Args:
      rows: int32 [local_batch], the global row index of each local row (axis 0 of every
        dropout input).
    """
    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
            return _row_dropout(context.module, rows, *args, **kwargs)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
