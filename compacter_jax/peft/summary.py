"""Trainable / total parameters of a tree, in all and per module (as PEFT's
`print_trainable_parameters`), from the same labels and counter as the split itself.

    print(cj.summary(params, method))                    # a Method on the library's T5
    print(cj.summary(params, r"lora_|ln_", depth=1))     # any model, with a path rule

    trainable params: 104,704 || all params: 222,903,552 || trainable%: 0.0470
    module                       trainable        total  trainable%
    decoder/block_*                 57,344  ...
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util as traverse_util

from compacter_jax.peft.partition import TRAINABLE, count, label_params

_BLOCK = re.compile(r"^block_\d+$")


@dataclasses.dataclass(frozen=True)
class ModuleCount:
    """One row of the summary: `module` (a '/'-joined path prefix), its trainable and total
    parameter counts."""

    module: str
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def count_by_module(params: Mapping[str, Any], labels_or_rule: Any, *, depth: int = 2,
                    merge_blocks: bool = True) -> tuple[ModuleCount, list[ModuleCount]]:
    """(all, per module) trainable/total counts.

    Args:
      params: nested dict of arrays or ShapeDtypeStructs.
      labels_or_rule: a label tree, a Method (checked against its T5) or a path rule (a regex,
        a predicate path -> bool, a `PathRule`), as `split` takes.
      depth: modules are path prefixes of this many names.
      merge_blocks: count `block_0`, `block_1`, ... together as `block_*`.
    Returns:
      The whole tree's counts (module "all"; for a method whose trainable numbers live beside
      the tree, Intrinsic-SAID, its `trainable_count`) and one row per module, in path order.
    """
    labels = labels_or_rule
    if not isinstance(labels_or_rule, Mapping):
        labels = label_params(params, labels_or_rule)
    flat = traverse_util.flatten_dict(dict(params))
    flat_labels = traverse_util.flatten_dict(dict(labels))
    rows: dict[str, list[int]] = {}
    for path, value in flat.items():
        names = [("block_*" if merge_blocks and _BLOCK.match(str(n)) else str(n))
                 for n in path[:depth]]
        row = rows.setdefault("/".join(names), [0, 0])
        n = count(value)
        row[0] += n if flat_labels[path] == TRAINABLE else 0
        row[1] += n
    per_module = [ModuleCount(m, t, n) for m, (t, n) in rows.items()]
    trainable = sum(r.trainable for r in per_module)
    if hasattr(labels_or_rule, "trainable_count") and not isinstance(labels_or_rule, Mapping):
        trainable = labels_or_rule.trainable_count(params)
    return ModuleCount("all", trainable, count(params)), per_module


def summary(params: Mapping[str, Any], labels_or_rule: Any, *, depth: int = 2,
            merge_blocks: bool = True) -> str:
    """The PEFT-style line "trainable params: N || all params: M || trainable%: P" and a table
    of the modules (see `count_by_module` for the arguments)."""
    whole, rows = count_by_module(params, labels_or_rule, depth=depth,
                                  merge_blocks=merge_blocks)
    width = max([len("module"), *(len(r.module) for r in rows)])
    lines = [f"trainable params: {whole.trainable:,} || all params: {whole.total:,} || "
             f"trainable%: {whole.percent:.4f}",
             f"{'module':<{width}} {'trainable':>13} {'total':>13} {'trainable%':>11}"]
    lines += [f"{r.module:<{width}} {r.trainable:>13,} {r.total:>13,} {r.percent:>11.4f}"
              for r in rows]
    return "\n".join(lines)


def print_trainable_parameters(params: Mapping[str, Any], labels_or_rule: Any, **kwargs: Any
                               ) -> None:
    """Prints `summary(params, labels_or_rule, **kwargs)`."""
    print(summary(params, labels_or_rule, **kwargs))
