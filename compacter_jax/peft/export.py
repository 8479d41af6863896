"""Trained PEFT parameters alone, on disk, and back onto a backbone.

    save_adapter("runs/rte/adapter", trainable, method, model="t5-base")
    model, params = load_adapter("runs/rte/adapter", backbone="t5-base")

An export directory holds

    trainable.safetensors   the trainable tree, flat keys "encoder/block_0/.../kernel"
                            (scanned trees are stored per block: loads into either layout)
    trainable_config.json   {"method": Method.to_dict(), "model": ..., other metadata,
                             "tensors": {key: [shape, dtype]}, "sha256": {file: digest}}

The JSON lists every tensor the export must hold and a checksum of the weights file, so a
missing tensor, a flipped bit or an edited method field is refused on load. Exports written
before the manifest existed (flat `PeftConfig` JSON, no checksum) still load.
A Compacter++ export of T5-base is about 0.4 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compacter_jax.host import to_host
from compacter_jax.models import stack_blocks, unstack_blocks
from compacter_jax.peft import model as peft_model
from compacter_jax.peft import sparsity
from compacter_jax.peft.legacy import method_from_dict
from compacter_jax.peft.method import Method

WEIGHTS = "trainable.safetensors"
CONFIG = "trainable_config.json"


class AdapterFileError(ValueError):
    """An export directory that is missing, incomplete, corrupt or does not fit the backbone."""


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _method_digest(record: Mapping[str, Any]) -> str:
    """Checksum of everything in the JSON but the checksums themselves."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def export_trainable(path: str | os.PathLike, params: Any, metadata: Mapping[str, Any]) -> Path:
    """Writes a (host or device) parameter tree and JSON `metadata` to `path/`.

    Replaces an existing export atomically (written to a temporary sibling, then renamed).
    Only process 0 writes. Non-finite values are refused (ValueError).
    """
    from safetensors.flax import save_file  # handles bfloat16, unlike the numpy backend

    path = Path(path)
    flat = traverse_util.flatten_dict(to_host(params))
    if jax.process_index() != 0:
        return path
    bad = [k for k in flat if any("/" in str(part) for part in k)]
    if bad:
        raise ValueError(f"parameter names must not contain '/': {bad[:3]}")
    nonfinite = ["/".join(k) for k, v in flat.items()
                 if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if nonfinite:
        raise ValueError(f"refusing to export non-finite parameters: {nonfinite[:3]}")
    tensors = {"/".join(map(str, k)): jnp.asarray(v) for k, v in flat.items()}
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, tmp / WEIGHTS)
        record = {**dict(metadata),
                  "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(tensors.items())}}
        record["sha256"] = {WEIGHTS: _digest(tmp / WEIGHTS), CONFIG: _method_digest(record)}
        (tmp / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True))
        # safetensors writes 0600; give the weights the mode a plain open() gave the JSON.
        os.chmod(tmp / WEIGHTS, (tmp / CONFIG).stat().st_mode & 0o777)
        old = path.with_name(path.name + f".old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)       # keep the previous export until the new one is in place
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_trainable(path: str | os.PathLike) -> tuple[dict, dict]:
    """(nested dict of numpy params, metadata) written by `export_trainable`, verified against
    its manifest (tensor list and checksums) when it has one."""
    from safetensors import SafetensorError
    from safetensors.flax import load_file

    path = Path(path)
    weights, config = path / WEIGHTS, path / CONFIG
    for f in (weights, config):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: is {path} an adapter export (save_adapter / "
                                   "experiments.glue writes one to WORKDIR/adapter)?")
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config}: not valid JSON ({e}); re-export the adapter") from None
    if not isinstance(meta, dict):
        raise AdapterFileError(f"{config}: expected a JSON object, got {type(meta).__name__}")
    sums, expected = meta.get("sha256"), meta.get("tensors")
    for key, value in (("sha256", sums), ("tensors", expected)):
        if value is not None and not isinstance(value, dict):
            raise AdapterFileError(f"{config}: field {key!r} must be an object, got "
                                   f"{type(value).__name__}; re-export the adapter")
    if sums is not None:
        if sums.get(CONFIG) != _method_digest(meta):
            raise AdapterFileError(f"{config} was modified after export (checksum mismatch); "
                                   "re-export the adapter instead of editing it")
        if sums.get(WEIGHTS) != _digest(weights):
            raise AdapterFileError(f"{weights} is corrupt (sha256 differs from the manifest); "
                                   "re-export or re-copy the adapter")
    try:
        loaded = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"cannot read {weights} (truncated or corrupt?): {e}") from None
    flat = {tuple(k.split("/")): np.asarray(v) for k, v in loaded.items()}
    if expected is not None:
        missing = sorted(set(expected) - set(loaded))
        extra = sorted(set(loaded) - set(expected))
        if missing or extra:
            raise AdapterFileError(f"{weights}: tensors differ from the manifest (missing "
                                   f"{missing[:5]}, unexpected {extra[:5]})")
        for key, value in sorted(loaded.items()):
            want = expected[key]
            got = [list(value.shape), str(value.dtype)]
            if not (isinstance(want, (list, tuple)) and len(want) == 2
                    and isinstance(want[0], (list, tuple))):
                raise AdapterFileError(f"{config}: manifest entry for {key!r} is {want!r}, "
                                       "expected [shape, dtype]; re-export the adapter")
            if [list(want[0]), str(want[1])] != got:
                raise AdapterFileError(f"{weights}: tensor {key!r} is {got[1]}{got[0]}, the "
                                       f"manifest says {want[1]}{list(want[0])}")
    nonfinite = ["/".join(k) for k, v in flat.items()
                 if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
    if nonfinite:
        raise AdapterFileError(f"{weights}: non-finite values in {nonfinite[:3]}")
    return traverse_util.unflatten_dict(flat), meta


def save_adapter(path: str | Path, trainable: Any, method: Method, **metadata: Any) -> Path:
    """Writes the trainable tree and `method` (plus JSON-able `metadata`, e.g. the backbone
    `model` and `init_seed`) to `path/`. Scanned trees are stored per block, so an export loads
    into scanned and unscanned models alike."""
    return export_trainable(path, unstack_blocks(trainable),
                            {"method": method.to_dict(), **metadata})


def method_of_export(meta: Mapping[str, Any], path: str | Path = "") -> Method:
    """The Method recorded in an export's JSON (today's or the legacy PeftConfig layout)."""
    if "method" not in meta:
        raise AdapterFileError(f"{path}: the export's JSON has no 'method' (was it written by "
                               "save_adapter / experiments.glue?)")
    try:
        return method_from_dict(meta["method"])
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{path}: the export's method does not build: {e}") from None


def load_adapter(path: str | Path, backbone: str | None = None, *, dtype: str = "float32",
                 scan_layers: bool = False) -> tuple[Any, dict]:
    """(model, params): `backbone` (checkpoint dir, cached Hub id or `random:<preset>`;
    default: the model recorded in the export) with the exported parameters put in place;
    `params` is what the model is applied with (`method.combine(trainable, frozen)`).
    A `random:` backbone is drawn from the export's `init_seed` (default 0), as in training.

    Raises AdapterFileError when the export is incomplete, corrupt, or does not fit the
    backbone (a missing or extra tensor, a shape mismatch), naming the path and parameter.
    """
    trained, meta = load_trainable(path)
    method = method_of_export(meta, path)
    if "sparsity_masks" in meta:  # SparseAdapter: pruned weights must still be zero
        try:
            sparsity.check_pruned(trained, meta["sparsity_masks"])
        except ValueError as e:
            raise AdapterFileError(f"{path}: {e}") from None
    backbone = backbone or meta.get("model")
    if not backbone:
        raise AdapterFileError(f"{path}: no backbone recorded; pass backbone=<checkpoint or "
                               "preset>")
    rng = jax.random.PRNGKey(int(meta.get("init_seed", 0)))
    model, params = peft_model.from_pretrained(backbone, method, rng, dtype=dtype,
                                               scan_layers=scan_layers)
    trainable, frozen = method.partition(params)
    if scan_layers:
        trained = stack_blocks(trained)
    want = traverse_util.flatten_dict(trainable)
    got = traverse_util.flatten_dict(trained)
    missing = sorted("/".join(k) for k in set(want) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(want))
    if missing or extra:
        raise AdapterFileError(
            f"{path}: the export does not fit {backbone} with method {method.name} "
            f"(scan_layers={scan_layers}): missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in got.items():
        if tuple(want[key].shape) != tuple(value.shape):
            raise AdapterFileError(f"{path}: parameter {'/'.join(key)} has shape {value.shape}, "
                                   f"the model expects {want[key].shape}")
        want[key] = jnp.asarray(value, dtype=want[key].dtype)
    return model, method.combine(traverse_util.unflatten_dict(want), frozen)
