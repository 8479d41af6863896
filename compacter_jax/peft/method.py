"""`Method`: one PEFT method as one object — what it inserts into T5 and what it trains.

A method is a frozen (hashable) dataclass holding only its own fields. It answers:

* `hooks(dtype)` — the `T5Hooks` that place its modules at the T5 insertion points
  (`compacter_jax.models.hooks`); the plain backbone gets `NO_HOOKS`;
* `is_trainable(path)` — whether one parameter path of the model is trained;
* `validate(t5_config)` — whether it fits a model (raises ValueError naming the field);
* `prepare(params, t5_config)` — a last touch after the backbone is loaded (e.g. prompt tuning
  copies vocabulary rows into its soft prompt);
* `partition(params)` / `combine(trainable, frozen)` — the trainable/frozen split and its
  inverse; `trainable_count(params)` — its size. The default splits by `is_trainable`;
  Intrinsic-SAID overrides them (its trainable vector is not part of the model's tree, and
  `combine` projects it onto the backbone);
* `learning_rate` — the peak rate of the paper's recipe for this method.

Families live one per module under `compacter_jax.peft.methods`; presets are instances in
`compacter_jax.peft.registry`. See docs/DESIGN.md ("Adding a method") for a worked example.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from compacter_jax.models import (NO_HOOKS, T5Config, T5Hooks, is_backbone_path,
                                  missing_backbone_paths)
from compacter_jax.peft import partition

ParamPath = tuple[str, ...]
LAYER_NORMS = ("layer_norm", "final_layer_norm")
# Fields every method has that are not part of its configuration proper (not CLI overrides).
BASE_FIELDS = ("name", "learning_rate")


def as_tuple(value: Any) -> Any:
    """Lists (from JSON or the command line) become tuples, so methods stay hashable."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def fits_type(value: Any, annotation: Any) -> bool:
    """Whether `value` is of a method field's annotated type (int, float, bool, str, tuples
    of them, `X | None`); a float field takes an int, an int field no bool or float, a tuple
    of str a str (a comma-separated list the method splits)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is tuple:
        if isinstance(value, str) and args == (str, Ellipsis):
            return True  # a comma-separated list, split by the method (ATTEMPT's sources)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return (isinstance(value, tuple) and len(items) == len(value)
                and all(fits_type(v, a) for v, a in zip(value, items)))
    if annotation is bool:
        return isinstance(value, (bool, np.bool_))
    if annotation is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if annotation is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if annotation is str:
        return isinstance(value, str)
    return True  # Literal, Any, ...: the method's own checks decide


def type_name(annotation: Any) -> str:
    """int -> "int", tuple[str, ...] -> "tuple[str, ...]", float | None -> "float | None"."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def is_peft_path(path: ParamPath) -> bool:
    """True for a parameter a method inserted (anything that is not a T5 checkpoint weight)."""
    return not is_backbone_path(path)


def is_layer_norm_path(path: ParamPath) -> bool:
    """True for a T5 layer-norm scale (the 62 `layer_norm` / `final_layer_norm` of T5-base)."""
    return is_backbone_path(path) and any(name in LAYER_NORMS for name in path)


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every PEFT method (also usable as is: the backbone with nothing trained).

    Attributes:
      name: registry name of the preset this came from ("compacter++", ...); recorded in
        exports and summaries.
      learning_rate: the recommended peak learning rate (the paper's recipe).
    Class attributes:
      task_prefix: the original code prepends the task name to every input unless adapters
        are trained; True for full fine-tuning, BitFit, prompt tuning and Intrinsic-SAID.
      packable: whether training on packed rows (several examples per row) is supported.
      bankable: whether K instances can be stacked into a bank served per example (a method
        whose trainable parameters are shared across tasks cannot be split per task).
    """

    name: str = "custom"
    learning_rate: float = 3e-4

    task_prefix: ClassVar[bool] = True
    packable: ClassVar[bool] = True
    bankable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            raise ValueError(f"{type(self).__name__}.learning_rate must be > 0, got "
                             f"{self.learning_rate!r}")

    # -- what the method inserts and trains ------------------------------------------------
    def hooks(self, dtype: str | None = None) -> T5Hooks:
        """The insertion-point hooks of this method; `dtype` is the compute dtype of the
        inserted modules (their parameters are float32)."""
        return NO_HOOKS

    def is_trainable(self, path: ParamPath) -> bool:
        """Whether the parameter at `path` (a tuple of names) is trained. Default: exactly
        the parameters the method inserted."""
        return is_peft_path(path)

    def validate(self, t5: T5Config) -> None:
        """Raises ValueError (naming the field and the fix) if the method does not fit `t5`."""

    def prepare(self, params: dict, t5: T5Config) -> dict:
        """Params after the backbone is loaded and the method's params initialised."""
        return params

    # -- trainable / frozen ----------------------------------------------------------------
    def check_params(self, params: Mapping[str, Any]) -> None:
        """Raises ValueError when `params` is not a tree of the library's T5 (the method tells
        trainable from frozen by T5 weight names: on another tree it would train everything).
        The message names the missing weights and the way for other models."""
        missing = missing_backbone_paths(params)
        if missing:
            top = sorted(map(str, params))[:8] if isinstance(params, Mapping) else []
            raise ValueError(
                f"method {self.name!r} ({type(self).__name__}) splits a compacter_jax T5 "
                f"parameter tree, but this tree lacks the T5 weights {', '.join(missing)} "
                f"(its top-level keys: {top}). For another model pass an explicit rule: "
                "compacter_jax.split(params, r'adapter|layer_norm') or freezing_optimizer("
                "path_rule(predicate), tx); for a T5 pass the full tree, not a part of it")

    def pins_frozen(self, path: tuple[str, ...]) -> bool:
        """Whether `path` is a frozen leaf outside the backbone that the adapter depends on and
        that is loaded from elsewhere (ATTEMPT's source prompts): an export's backbone
        fingerprint covers such leaves too, so a changed source is refused on reload."""
        return False

    def shared_across_tasks(self, path: tuple[str, ...]) -> bool:
        """Whether the trainable leaf at `path` is one for every task of a multi-task bank
        rather than one per task (multi-task ATTEMPT's attention module; `peft.bank`)."""
        return False

    def partition(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        """(trainable, frozen) parts of the full parameter tree of the library's T5 (a tree
        without its T5 weights raises ValueError, see `check_params`)."""
        return partition.split(params, partition.label_params(params, self))

    def combine(self, trainable: Any, frozen: Any) -> dict:
        """The parameters the model is applied with (the `merge_fn` of the train step)."""
        return partition.merge(trainable, frozen)

    def trainable_count(self, params: Any) -> int:
        """How many numbers `partition(params)` trains; `params` may be ShapeDtypeStructs."""
        return partition.trainable_count(params, self)

    # -- configuration ---------------------------------------------------------------------
    def replace(self, **changes: Any) -> "Method":
        """A copy with fields replaced (checks rerun); an unknown field or a value not of the
        field's type (`fits_type`) raises ValueError naming it."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown} for method {self.name!r} ({type(self).__name__}); "
                f"valid fields: {', '.join(self.config_field_names())}")
        changes = {k: as_tuple(v) for k, v in changes.items()}
        hints = typing.get_type_hints(type(self))
        for k, v in changes.items():
            if not fits_type(v, hints[k]):
                raise ValueError(f"field {k}={v!r} of method {self.name!r} "
                                 f"({type(self).__name__}): expected {type_name(hints[k])}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def config_field_names(cls) -> tuple[str, ...]:
        """The method's own fields (what `--config.peft.<field>` may override)."""
        return tuple(n for n in cls.field_names() if n not in BASE_FIELDS)

    @classmethod
    def field_types(cls) -> dict[str, Any]:
        """Field name -> annotated type (resolved), for building CLI placeholders."""
        hints = typing.get_type_hints(cls)
        return {n: hints[n] for n in cls.config_field_names()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record: the family (class) name and every field."""
        d = dataclasses.asdict(self)
        return {"family": type(self).__name__,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}
