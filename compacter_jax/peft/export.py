"""Trained PEFT parameters alone, on disk, and back onto a pretrained backbone.

    save_adapter("runs/rte/adapter", trainable, peft_config, model="t5-base")
    model, params = load_adapter("runs/rte/adapter", backbone="t5-base")

The export is flat safetensors plus a JSON with the method's
`PeftConfig` (see `compacter_jax.train.checkpoint.export_trainable`); a Compacter++ export of
T5-base is about 0.4 MB.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from compacter_jax.models.hf_io import stack_blocks, unstack_blocks
from compacter_jax.peft.methods import PeftConfig


def save_adapter(path: str | Path, trainable: Any, config: PeftConfig, **metadata: Any) -> Path:
    """Writes the trainable tree and `config` (plus JSON-able `metadata`) to `path/`.
    Scanned trees (`{stack}/blocks/...`) are stored per block, so an export loads into
    scanned and unscanned models alike."""
    from compacter_jax.train.checkpoint import export_trainable

    return export_trainable(path, unstack_blocks(trainable),
                            {"method": dataclasses.asdict(config), **metadata})


def load_adapter(path: str | Path, backbone: str | None = None, *, dtype: str = "float32",
                 scan_layers: bool = False) -> tuple[Any, dict]:
    """(model, params): `backbone` (checkpoint dir, cached Hub id or `random:<preset>`;
    default: the model recorded in the export) with the exported PEFT params put in place.
    A `random:` backbone is drawn from the export's `init_seed` (default 0), as in training.

    Raises ValueError when the export does not fit the backbone (a missing or extra path,
    or a shape mismatch), naming the parameter.
    """
    from compacter_jax.peft import from_pretrained_with_method
    from compacter_jax.train.checkpoint import load_trainable

    trained, meta = load_trainable(path)
    if "method" not in meta:
        raise ValueError(f"{path}: the export's JSON has no 'method' (was it written by "
                         "save_adapter / experiments.glue?)")
    config = PeftConfig(**meta["method"])
    backbone = backbone or meta.get("model")
    if not backbone:
        raise ValueError(f"{path}: no backbone recorded; pass backbone=<checkpoint or preset>")
    # random:<preset> backbones are re-drawn from the seed they were trained on.
    rng = jax.random.PRNGKey(int(meta.get("init_seed", 0)))
    model, params = from_pretrained_with_method(backbone, config, rng, dtype=dtype,
                                                scan_layers=scan_layers)
    if scan_layers:
        trained = stack_blocks(trained)
    flat = traverse_util.flatten_dict(params)
    for key, value in traverse_util.flatten_dict(trained).items():
        if key not in flat:
            raise ValueError(f"{path}: parameter {'/'.join(key)} does not exist in {backbone} "
                             f"with method {config.method} (scan_layers={scan_layers}?)")
        if tuple(flat[key].shape) != tuple(value.shape):
            raise ValueError(f"{path}: parameter {'/'.join(key)} has shape {value.shape}, the "
                             f"model expects {flat[key].shape}")
        flat[key] = jnp.asarray(value, dtype=flat[key].dtype)
    return model, traverse_util.unflatten_dict(flat)
