"""The training state: everything that changes during training, and nothing frozen.

`TrainState` is a pytree (flax struct dataclass) so it can be passed through `jit`/`pmap`,
donated, replicated and checkpointed as one object. The frozen backbone is deliberately *not*
part of it: it is passed to the train step as a separate argument and never saved in training
checkpoints.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


def as_raw_key(rng: jax.Array | int) -> jax.Array:
    """Returns a raw `uint32[2]` key from a seed, a raw key or a typed `jax.random.key`.

    Raw keys are plain arrays, so they checkpoint, replicate and shard like any other leaf.
    """
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    rng = jnp.asarray(rng)
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    if rng.dtype != jnp.uint32 or rng.shape != (2,):
        raise ValueError(f"rng must be a seed, jax.random.key or PRNGKey uint32[2]; got "
                         f"{rng.dtype}{list(rng.shape)}")
    return rng


@struct.dataclass
class TrainState:
    """Attributes:
      step: int32 scalar, number of optimizer updates applied so far.
      params: the trainable parameter tree (nested dict of float arrays).
      opt_state: the optax state of `params` (built from the trainable tree only).
      rng: raw uint32[2] base key; the dropout key of a step is derived from it and `step`,
        so it never needs to be advanced and a restored run draws the same masks.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation,
               rng: jax.Array | int) -> "TrainState":
        """A fresh state at step 0 with `tx.init(params)` as optimizer state."""
        return cls(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=tx.init(params), rng=as_raw_key(rng))
