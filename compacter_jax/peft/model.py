"""A T5 with a PEFT method inserted: built from a config, or loaded from a checkpoint."""

from __future__ import annotations

from typing import Any

import jax

from compacter_jax.models import T5Config, T5ForConditionalGeneration
from compacter_jax.models import from_pretrained as load_backbone
from compacter_jax.peft.method import Method
from compacter_jax.peft.registry import get_method


def build_model(t5_config: T5Config, method: Method | str) -> T5ForConditionalGeneration:
    """T5ForConditionalGeneration(t5_config) with the hooks of `method` (validated)."""
    method = get_method(method)
    method.validate(t5_config)
    return T5ForConditionalGeneration(t5_config, hooks=method.hooks(dtype=t5_config.dtype))


def from_pretrained(name_or_path: str, method: Method | str | None = None,
                    rng: jax.Array | None = None, *, dtype: str = "float32",
                    param_dtype: str = "float32", scan_layers: bool = False,
                    remat: bool = False, revision: str | None = None,
                    local_files_only: bool = False, **overrides: Any):
    """(model, params): the T5 from `name_or_path` (checkpoint dir, Hub id downloaded when not
    cached, at `revision`, or `random:<preset>`; see `compacter_jax.models.from_pretrained`)
    with `method` (a preset name or a Method, with `overrides` of its fields; None = the plain
    backbone). Backbone params are loaded unchanged; only the
    method's new params are initialised (with `rng`, default PRNGKey(0)), then
    `method.prepare` runs (e.g. prompt tuning's vocabulary init)."""
    method = get_method(method or Method(name="backbone"), **overrides)
    hooks = method.hooks(dtype=dtype)
    model, params = load_backbone(name_or_path, hooks=hooks, dtype=dtype,
                                  param_dtype=param_dtype, scan_layers=scan_layers,
                                  remat=remat, rng=rng, revision=revision,
                                  local_files_only=local_files_only)
    method.validate(model.config)
    return model, method.prepare(params, model.config)
