"""Split a parameter tree into trainable and frozen parts, and merge them back.

Parameters are nested dicts (flax linen `params`). A *label tree* has the same structure
with a string label per leaf ("trainable" or "frozen"). `split` returns two nested dicts
that each hold only their own leaves, so gradients and optimizer state exist only for the
trainable part; `merge` puts them back together.

`label_params(params, method)` builds the label tree from parameter paths with the method's
`is_trainable(path)` (see `compacter_jax.peft.method.Method`): e.g. the parameters a method
inserted, plus the layer-norm scales for the adapter methods (paper §3), or everything for full
fine-tuning. The rest of the backbone, including `lm_head` and the token embedding, is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util as traverse_util
import jax
import numpy as np
import optax

TRAINABLE = "trainable"
FROZEN = "frozen"

Params = Mapping[str, Any]
# A Method (anything with `is_trainable(path) -> bool`) or such a predicate itself.
TrainablePredicate = Callable[[tuple[str, ...]], bool]


def split(params: Params, labels: Params) -> tuple[dict, dict]:
    """Returns (trainable, frozen) nested dicts holding the leaves labelled as such."""
    flat = traverse_util.flatten_dict(params, sep="/")
    flat_labels = traverse_util.flatten_dict(labels, sep="/")
    if flat.keys() != flat_labels.keys():
        missing = sorted(set(flat) ^ set(flat_labels))[:5]
        raise ValueError(f"labels do not match params; differing paths include {missing}")
    unknown = {v for v in flat_labels.values()} - {TRAINABLE, FROZEN}
    if unknown:
        raise ValueError(f"labels must be {TRAINABLE!r} or {FROZEN!r}, got {sorted(unknown)}")
    trainable = {k: v for k, v in flat.items() if flat_labels[k] == TRAINABLE}
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == FROZEN}
    return (traverse_util.unflatten_dict(trainable, sep="/"),
            traverse_util.unflatten_dict(frozen, sep="/"))


def merge(trainable: Params, frozen: Params) -> dict:
    """Inverse of `split`: one nested dict with the leaves of both (paths must not overlap)."""
    flat_t = traverse_util.flatten_dict(dict(trainable), sep="/")
    flat_f = traverse_util.flatten_dict(dict(frozen), sep="/")
    overlap = flat_t.keys() & flat_f.keys()
    if overlap:
        raise ValueError(f"trainable and frozen trees overlap at {sorted(overlap)[:5]}")
    return traverse_util.unflatten_dict({**flat_f, **flat_t}, sep="/")


def _predicate(method_or_predicate: Any) -> TrainablePredicate:
    return getattr(method_or_predicate, "is_trainable", method_or_predicate)


def label_params(params: Params, method: Any) -> dict:
    """Label tree (same structure as `params`, leaves "trainable"/"frozen") for `method` (a
    Method, or a predicate path -> bool).

    Works on arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), scanned or not.
    """
    is_trainable = _predicate(method)
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict(
        {p: TRAINABLE if is_trainable(p) else FROZEN for p in flat})


def count(params: Params) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


def trainable_count(params: Params, labels_or_method: Any) -> int:
    """Number of trainable scalars of `params` under a label tree or a Method."""
    labels = labels_or_method
    if not isinstance(labels_or_method, Mapping):
        labels = label_params(params, labels_or_method)
    flat = traverse_util.flatten_dict(dict(params))
    flat_labels = traverse_util.flatten_dict(dict(labels))
    return int(sum(int(np.prod(v.shape)) for p, v in flat.items() if flat_labels[p] == TRAINABLE))


def freezing_optimizer(labels: Any, tx: optax.GradientTransformation
                       ) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates (and no state) on frozen ones.

    A safety net for code that keeps the whole tree in one optimizer: the library's train
    step differentiates only the trainable tree and never sees frozen leaves. `labels` is a
    label tree, a Method (labels computed from the params' paths), or a callable
    params -> labels.
    """
    if hasattr(labels, "is_trainable"):
        method = labels
        labels = lambda params: label_params(params, method)  # noqa: E731
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
