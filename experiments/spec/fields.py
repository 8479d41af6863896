"""The fields of a run's config: an unknown field names the valid ones, a missing one is named;
and the value checks every run's spec is written with (`ConfigError` naming `--config.<field>`,
the value and the fix)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class ConfigError(ValueError):
    """A config field with a value the run cannot use; the message names `--config.<field>`."""


def flag(field: str, value: Any) -> str:
    return f"--config.{field}={value!r}"


# ------------------------------------------------------------------------------ fields


def _is_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) or hasattr(value, "keys") and hasattr(value, "items")


def _leaves(config, prefix: str) -> list[str]:
    """The dotted paths of the leaves below `config` (itself when it is a leaf)."""
    if not _is_mapping(config):
        return [prefix[:-1]]
    return [p for k in config.keys() for p in _leaves(config[k], f"{prefix}{k}.")] or [
        prefix[:-1]]


def unknown_fields(config, known, prefix: str = "", *, free: tuple[str, ...] = ()
                   ) -> list[str]:
    """One message per field of `config` that `known` lacks, in the config's order:
    `--config.<path>: config.<parent> has no field '<name>'; valid fields: ...`."""
    problems = []
    valid = ", ".join(sorted(known.keys()))
    where = f"config.{prefix[:-1]}" if prefix else "config"
    for key in config.keys():
        if key not in known:
            problems += [f"--config.{leaf}: {where} has no field {key!r}; valid fields: {valid}"
                         for leaf in _leaves(config[key], f"{prefix}{key}.")]
        elif (f"{prefix}{key}" not in free and _is_mapping(known[key])
              and _is_mapping(config[key])):
            problems += unknown_fields(config[key], known[key], f"{prefix}{key}.", free=free)
    return problems


def unknown_override(config, path: str) -> str | None:
    """The message for a `--config.<path>` override naming no field of `config` (with the
    valid fields of its parent), or None when the field exists."""
    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
        if not _is_mapping(node) or part not in node:
            parent = ".".join(["config", *parts[:i]])
            valid = ", ".join(sorted(node.keys())) if _is_mapping(node) else ""
            return (f"--config.{path}: {parent} has no field {part!r}"
                    + (f"; valid fields: {valid}" if valid else ""))
        node = node[part]
    return None


def _missing_fields(config, known, prefix: str = "") -> list[str]:
    out = []
    for key in known.keys():
        if key not in config:
            out.append(f"{prefix}{key}")
        elif _is_mapping(known[key]) and _is_mapping(config[key]):
            out += _missing_fields(config[key], known[key], f"{prefix}{key}.")
    return out


def check_fields(config, known, *, free: tuple[str, ...] = ()) -> None:
    """Refuses every field `known` (the run's default config) lacks, naming the valid ones,
    and a field it has that `config` lacks.

    Args:
      config / known: ConfigDicts (or mappings); nested ones are compared field by field.
      free: dotted names of nested fields whose own keys are checked elsewhere.
    Raises:
      ConfigError naming each unknown `--config.<field>` (all at once), or the missing one.
    """
    problems = unknown_fields(config, known, free=free)
    if problems:
        raise ConfigError("; ".join(problems))
    missing = _missing_fields(config, known)
    if missing:
        raise ConfigError(f"--config.{missing[0]} is missing from the config; add it (the "
                          "run's default config file has every field)")


def glue_defaults():
    """The fields of a fine-tuning run (`experiments/configs/glue.py`)."""
    from experiments.configs import glue  # noqa: PLC0415 (configs are data read at run time)
    return glue.get_config()


def multitask_defaults():
    """The fields of a multi-task run (`experiments/configs/multitask.py`: no `task`)."""
    from experiments.configs import multitask  # noqa: PLC0415
    return multitask.get_config()


def pretrain_defaults():
    from experiments.configs import pretrain  # noqa: PLC0415
    return pretrain.get_config()


# ------------------------------------------------------------------------------ values


def check_int(config, field: str, ok: Callable[[int], bool], want: str) -> None:
    if field not in config:
        return
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{flag(field, value)}: expected an integer, {want}")
    if not ok(int(value)):
        raise ConfigError(f"{flag(field, value)}: must be {want}")


def check_float(config, field: str, ok: Callable[[float], bool], want: str,
                 optional: bool = False) -> None:
    if field not in config:
        return
    value = config[field]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ConfigError(f"{flag(field, value)}: expected a number, {want}")
    if not math.isfinite(float(value)) or not ok(float(value)):
        raise ConfigError(f"{flag(field, value)}: must be {want}")


def check_choice(config, field: str, choices: tuple[str, ...]) -> None:
    if field in config and config[field] not in choices:
        raise ConfigError(f"{flag(field, config[field])}: use one of {', '.join(choices)}")


def positive(v):
    return v >= 1


def minus_one_or_positive(v):
    return v == -1 or v >= 1
