"""Parameter trees on the host: device -> host copies, the one NaN/inf check and the one
parameter counter (for checkpoints, exports, loaded weights, decoding, parameter reports)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def to_host(tree: Any) -> Any:
    """numpy copies of every leaf of `tree`.

    Copies, never views: a device buffer may be donated to the next train step. A leaf that
    spans processes (multi-host) is read from this process's first shard when it is
    replicated, and all-gathered otherwise (every process must then call this together).
    """
    def leaf(x: Any) -> np.ndarray:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                x = x.addressable_data(0)
            else:
                from jax.experimental import multihost_utils
                x = multihost_utils.process_allgather(x, tiled=True)
        return np.array(x)
    return jax.tree_util.tree_map(leaf, tree)


def _named_leaves(tree: Any, prefix: tuple[str, ...] = ()):
    """(name parts, leaf): mappings in their own key order (as `flatten_dict`), any other
    pytree by its jax key path."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _named_leaves(value, (*prefix, str(key)))
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield (*prefix, *(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                          for k in path)), leaf


def nonfinite_leaves(tree: Any) -> list[str]:
    """The '/'-joined paths of the floating-point leaves of `tree` that hold NaN or inf.

    Args:
      tree: a pytree of arrays (host or device; device leaves are copied to check them), e.g.
        params, a TrainState's state dict, or `{name: array}`. Nested mappings are walked in
        their key order; bfloat16 and other jax float types count as floating.
    Returns:
      e.g. ["encoder/block_0/adapter/kernel"], in tree order; [] when every leaf is finite.
    """
    bad = []
    for parts, leaf in _named_leaves(tree):
        value = np.asarray(leaf)
        if jnp.issubdtype(value.dtype, jnp.floating) and not np.isfinite(value).all():
            bad.append("/".join(parts))
    return bad


def param_count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays or `jax.ShapeDtypeStruct`s (exact: Python
    integers, no int32/int64 overflow for any size)."""
    return sum(math.prod(int(d) for d in np.shape(x)) for x in jax.tree_util.tree_leaves(tree))
