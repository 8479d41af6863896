"""Split a parameter tree into trainable and frozen parts, and merge them back.

Parameters are nested dicts (flax linen `params`). A *label tree* has the same structure
with a string label per leaf ("trainable" or "frozen"). `split` returns two nested dicts
that each hold only their own leaves, so gradients and optimizer state exist only for the
trainable part; `merge` puts them back together.

`label_params(params, method)` builds the label tree from parameter paths with the method's
`is_trainable(path)` (see `compacter_jax.peft.method.Method`): e.g. the parameters a method
inserted, plus the layer-norm scales for the adapter methods (paper §3), or everything for full
fine-tuning. The rest of the backbone, including `lm_head` and the token embedding, is frozen.
A Method answers for the library's T5 only: on a tree without the T5 weights it expects it
raises (naming them) instead of reading "not a T5 weight" as "inserted by the method".

Any other model says what it trains with an explicit path rule: a regex searched in the
'/'-joined path, or a predicate on the path tuple (`path_rule`):

    trainable, frozen = split(params, r"adapter|layer_norm")
    tx = freezing_optimizer(path_rule(lambda path: "lora" in path), optax.adamw(1e-3))
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util as traverse_util
import optax

from compacter_jax.host import param_count

TRAINABLE = "trainable"
FROZEN = "frozen"

Params = Mapping[str, Any]
# A Method (anything with `is_trainable(path) -> bool`) or such a predicate itself.
TrainablePredicate = Callable[[tuple[str, ...]], bool]


@dataclasses.dataclass(frozen=True)
class PathRule:
    """An explicit trainable rule for any model's parameter tree.

    Attributes:
      pattern: a regex, searched (`re.search`) in the '/'-joined path ("a/b/kernel"); or None.
      predicate: `path tuple -> bool`; or None. Exactly one of the two is set.
    """

    pattern: str | None = None
    predicate: TrainablePredicate | None = None

    def __post_init__(self) -> None:
        if (self.pattern is None) == (self.predicate is None):
            raise ValueError("PathRule takes exactly one of pattern= (a regex) or predicate=")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"path rule {self.pattern!r} is not a valid regex: {e}") from None

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        if self.pattern is not None:
            return re.search(self.pattern, "/".join(map(str, path))) is not None
        return bool(self.predicate(path))

    def describe(self) -> str:
        return (f"regex {self.pattern!r}" if self.pattern is not None
                else f"predicate {getattr(self.predicate, '__name__', self.predicate)!r}")


def path_rule(rule: "str | re.Pattern | TrainablePredicate | PathRule") -> PathRule:
    """A `PathRule` from a regex (str or compiled) or a predicate `path tuple -> bool`."""
    if isinstance(rule, PathRule):
        return rule
    if isinstance(rule, re.Pattern):
        return PathRule(pattern=rule.pattern)
    if isinstance(rule, str):
        return PathRule(pattern=rule)
    if callable(rule):
        return PathRule(predicate=rule)
    raise TypeError(f"a path rule is a regex or a predicate path -> bool, got "
                    f"{type(rule).__name__}")


def split(params: Params, labels: Any) -> tuple[dict, dict]:
    """Returns (trainable, frozen) nested dicts holding the leaves labelled as such.

    Args:
      params: nested dict of arrays (or ShapeDtypeStructs).
      labels: a label tree (same structure, leaves "trainable"/"frozen"); a Method (for the
        library's T5: raises ValueError on a tree without its T5 weights); or an explicit path
        rule for any model: a regex searched in the '/'-joined path, a predicate
        `path tuple -> bool`, or a `PathRule` (raises ValueError when it matches nothing).
    """
    if not isinstance(labels, Mapping):
        labels = label_params(params, labels)
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


def label_params(params: Params, method: Any) -> dict:
    """Label tree (same structure as `params`, leaves "trainable"/"frozen") for `method`: a
    Method (its `check_params` refuses a tree that is not its T5), or an explicit rule (a
    regex or a `PathRule`, refused when it matches no parameter; or a predicate path -> bool).

    Works on arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), scanned or not.
    """
    if hasattr(method, "check_params"):
        method.check_params(params)
    explicit = isinstance(method, (str, re.Pattern, PathRule))  # a user's rule: must match
    rule = method if hasattr(method, "is_trainable") else path_rule(method)
    flat = traverse_util.flatten_dict(dict(params))
    labels = {p: TRAINABLE if rule.is_trainable(p) else FROZEN for p in flat}
    if explicit and flat and TRAINABLE not in labels.values():
        examples = ", ".join("/".join(map(str, p)) for p in list(flat)[:4])
        raise ValueError(f"path rule {rule.describe()} matches none of the {len(flat)} "
                         f"parameters (e.g. {examples}): nothing would be trained; fix the rule")
    return traverse_util.unflatten_dict(labels)


def count(params: Params) -> int:
    """Number of scalars in a tree of arrays or ShapeDtypeStructs (`host.param_count`)."""
    return param_count(params)


def trainable_count(params: Params, labels_or_method: Any) -> int:
    """Number of trainable scalars of `params` under a label tree or a Method."""
    labels = labels_or_method
    if not isinstance(labels_or_method, Mapping):
        labels = label_params(params, labels_or_method)
    flat = traverse_util.flatten_dict(dict(params))
    flat_labels = traverse_util.flatten_dict(dict(labels))
    return param_count([v for p, v in flat.items() if flat_labels[p] == TRAINABLE])


def freezing_optimizer(labels: Any, tx: optax.GradientTransformation
                       ) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates (and no state) on frozen ones.

    A safety net for code that keeps the whole tree in one optimizer: the library's train
    step differentiates only the trainable tree and never sees frozen leaves. `labels` is a
    label tree; a Method (labels from the params' paths; its T5 weights must be there); an
    explicit path rule for any model: a regex (str or compiled) or a `PathRule` (wrap a
    predicate `path -> bool` with `path_rule`); or a callable params -> label tree.
    """
    if isinstance(labels, (str, re.Pattern)):
        labels = path_rule(labels)
    if hasattr(labels, "is_trainable"):
        method = labels
        labels = lambda params: label_params(params, method)  # noqa: E731
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)
