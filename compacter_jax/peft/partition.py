"""Split a parameter tree into trainable and frozen parts, and merge them back.

Parameters are nested dicts (flax linen `params`). A *label tree* has the same structure
with a string label per leaf ("trainable" or "frozen"). `split` returns two nested dicts
that each hold only their own leaves, so gradients and optimizer state exist only for the
trainable part; `merge` puts them back together.

`label_params(params, peft_config)` builds the label tree from parameter paths:
trainable are PEFT parameters (any path through `adapter`, `peft_root`, `prompt`, or a
`*_delta` module), the layer-norm scales (`layer_norm`, `final_layer_norm`) when the method
trains them (adapter methods, spec §3), and everything for full fine-tuning. The rest of the
backbone, including `lm_head` and the token embedding, is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flax.traverse_util as traverse_util
import jax
import numpy as np
import optax

if TYPE_CHECKING:
    from compacter_jax.peft.methods import PeftConfig

TRAINABLE = "trainable"
FROZEN = "frozen"

Params = Mapping[str, Any]


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


PEFT_MODULES = ("adapter", "peft_root", "prompt")
LAYER_NORMS = ("layer_norm", "final_layer_norm")


def path_label(path: tuple[str, ...], config: "PeftConfig") -> str:
    """TRAINABLE or FROZEN for one parameter path (a tuple of names)."""
    if config.train_all:
        return TRAINABLE
    if any(name in PEFT_MODULES or name.endswith("_delta") for name in path):
        return TRAINABLE
    if config.train_layer_norms and any(name in LAYER_NORMS for name in path):
        return TRAINABLE
    return FROZEN


def label_params(params: Params, config: "PeftConfig") -> dict:
    """Label tree (same structure as `params`, leaves "trainable"/"frozen") for `config`.

    Works on arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), scanned or not.
    """
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict({p: path_label(p, config) for p in flat})


def count(params: Params) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


def trainable_count(params: Params, labels_or_config: "Params | PeftConfig") -> int:
    """Number of trainable scalars of `params` under a label tree or a PeftConfig."""
    labels = labels_or_config
    if not isinstance(labels_or_config, Mapping):
        labels = label_params(params, labels_or_config)
    flat = traverse_util.flatten_dict(dict(params))
    flat_labels = traverse_util.flatten_dict(dict(labels))
    return int(sum(int(np.prod(v.shape)) for p, v in flat.items() if flat_labels[p] == TRAINABLE))


def make_optimizer(labels: "Params | PeftConfig | Callable[[Any], Any]",
                   tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates (and no state) on frozen ones.

    A safety net for code that keeps the whole tree in one optimizer: the preferred train
    step differentiates only `split(...)[0]` and never sees frozen leaves. `labels` is a label
    tree, a PeftConfig (labels computed from the params' paths), or a callable params -> labels.
    """
    if not isinstance(labels, Mapping) and not callable(labels):
        config = labels
        labels = lambda params: label_params(params, config)  # noqa: E731
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
