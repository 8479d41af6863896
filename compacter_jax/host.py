"""Device -> host copies of parameter trees (one helper for checkpoints, exports, decoding)."""

from __future__ import annotations

from typing import Any

import jax
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
