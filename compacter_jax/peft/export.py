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

The JSON also records how to rebuild the backbone exactly: `init_seed` for a `random:` backbone
and/or `backbone_sha256`, a fingerprint of the backbone weights the adapter was trained on
(`backbone_fingerprint`). `load_adapter` refuses a backbone whose fingerprint differs, naming
both; an export without the record (written before it existed) loads with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compacter_jax.atomic import atomic_directory, atomic_write
from compacter_jax.host import nonfinite_leaves, to_host
from compacter_jax.models import (is_backbone_path, missing_backbone_paths, stack_blocks,
                                  unstack_blocks)
from compacter_jax.models.config import is_random
from compacter_jax.peft import model as peft_model
from compacter_jax.peft import sparsity
from compacter_jax.peft.legacy import method_from_dict
from compacter_jax.peft.method import Method

WEIGHTS = "trainable.safetensors"
CONFIG = "trainable_config.json"


class AdapterFileError(ValueError):
    """An export directory that is missing, incomplete, corrupt or does not fit the backbone."""


SEED_RANGE = (0, 2**32 - 1)  # jax.random.PRNGKey keeps 32 bits: a larger seed would alias


def check_init_seed(seed: Any, where: str) -> int:
    """`seed` as the int a `random:` backbone is drawn with; ValueError naming `where` for
    anything else (a string, a bool, a seed PRNGKey would silently truncate)."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not lo <= seed <= hi:
        raise ValueError(f"{where}: init_seed {seed!r} is not an integer in {lo}..{hi} (the "
                         "seed of the PRNGKey the random backbone was drawn with)")
    return seed


def _check_record(meta: Mapping[str, Any], config: Path) -> None:
    """The backbone fields of an export's JSON that loading relies on, checked up front."""
    if "init_seed" in meta:
        try:
            check_init_seed(meta["init_seed"], str(config))
        except ValueError as e:
            raise AdapterFileError(f"{e}; re-export the adapter") from None
    vocab = meta.get("vocab_size")
    if vocab is not None and (isinstance(vocab, bool) or not isinstance(vocab, int)
                              or vocab < 1):
        raise AdapterFileError(f"{config}: vocab_size {vocab!r} is not a positive integer; "
                               "re-export the adapter")


def _stored_dtypes(weights: Path) -> dict[str, str]:
    """Tensor name -> dtype as stored in the safetensors header ("F32", "BF16", "I64", ...):
    the file's own, not that of the arrays loaded (JAX narrows int64 to int32)."""
    from safetensors import safe_open

    with safe_open(weights, framework="numpy") as f:
        return {k: f.get_slice(k).get_dtype() for k in f.keys()}


def _check_floating(stored: Mapping[str, str], weights: Path) -> None:
    """Trained parameters are floating point: a file storing an integer or boolean tensor is
    refused (loading would cast it to the model's dtype without a word)."""
    names = {f"{c}{bits}": f"{kind}{bits}" for c, kind in (("I", "int"), ("U", "uint"))
             for bits in (8, 16, 32, 64)} | {"BOOL": "bool"}
    bad = [f"{k} ({names.get(dtype, dtype)})" for k, dtype in sorted(stored.items())
           if not (dtype.startswith("F") or dtype == "BF16")]
    if bad:
        raise AdapterFileError(f"{weights}: tensors {bad[:3]} are not floating point; an "
                               "export holds trained (floating-point) parameters only: "
                               "re-export the adapter")


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

    Replaces an existing export atomically (`atomic_directory`: the old one stays until the
    new one is complete).
    Only process 0 writes. Non-finite values are refused (ValueError).
    """
    from safetensors.flax import save_file  # handles bfloat16, unlike the numpy backend

    path = Path(path)
    host = to_host(params)
    flat = traverse_util.flatten_dict(host)
    if jax.process_index() != 0:
        return path
    bad = [k for k in flat if any("/" in str(part) for part in k)]
    if bad:
        raise ValueError(f"parameter names must not contain '/': {bad[:3]}")
    integral = ["/".join(map(str, k)) for k, v in flat.items()
                if not jnp.issubdtype(v.dtype, jnp.floating)]
    if integral:
        raise ValueError(f"refusing to export non-floating-point tensors {integral[:3]}: an "
                         "export holds trained parameters (load_trainable refuses others)")
    nonfinite = nonfinite_leaves(host)
    if nonfinite:
        raise ValueError(f"refusing to export non-finite parameters: {nonfinite[:3]}")
    tensors = {"/".join(map(str, k)): jnp.asarray(v) for k, v in flat.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # The previous export stays in place until the new folder is complete.
    with atomic_directory(path) as tmp:
        atomic_write(tmp / WEIGHTS, lambda f: save_file(tensors, str(f)))  # mode as open() gives
        record = {**dict(metadata),
                  "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(tensors.items())}}
        record["sha256"] = {WEIGHTS: _digest(tmp / WEIGHTS), CONFIG: _method_digest(record)}
        atomic_write(tmp / CONFIG, json.dumps(record, indent=2, sort_keys=True))
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
    _check_record(meta, config)
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
        stored = _stored_dtypes(weights)
        loaded = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"cannot read {weights} (truncated or corrupt?): {e}") from None
    _check_floating(stored, weights)
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
    nonfinite = nonfinite_leaves(loaded)
    if nonfinite:
        raise AdapterFileError(f"{weights}: non-finite values in {nonfinite[:3]}")
    return traverse_util.unflatten_dict(flat), meta


FINGERPRINT = "backbone_sha256"


def backbone_fingerprint(params: Any, method: Method) -> str:
    """sha256 of the backbone weights an adapter of `method` relies on: every T5 weight of
    `params` that the method does not train (e.g. all but the layer norms for Compacter++),
    over sorted paths, shapes, dtypes and bytes; scanned and unscanned trees give the same.

    Args:
      params: the model's parameter tree as loaded (or the `frozen` part of its partition).
    Returns:
      "sha256:<hex>". Raises ValueError when a T5 weight the method does not train is absent.
    """
    flat = traverse_util.flatten_dict(unstack_blocks(dict(params)))
    missing = method_missing_backbone(params, method)
    if missing:
        raise ValueError(f"backbone_fingerprint: the tree lacks the backbone weights {missing} "
                         f"that {method.name} does not train; pass the parameters as loaded "
                         "(for Intrinsic-SAID: frozen['theta0'])")
    h = hashlib.sha256()
    for key in sorted(k for k in flat if (is_backbone_path(k) and not method.is_trainable(k))
                      or method.pins_frozen(k)):
        value = np.ascontiguousarray(np.asarray(jax.device_get(flat[key])))
        h.update(json.dumps(["/".join(key), list(value.shape), str(value.dtype)]).encode())
        h.update(value.view(np.uint8).reshape(-1).data)
    return "sha256:" + h.hexdigest()


def method_missing_backbone(params: Any, method: Method) -> list[str]:
    """The T5 weights absent from `params` that `method` does not train ('/'-joined)."""
    def trained(missing: str) -> bool:
        if "<" in missing:  # "{stack}/block_<i>/...": a stack's layers; ask for one kernel
            missing = f"{missing.split('/')[0]}/block_0/layer_0/SelfAttention/q/kernel"
        return method.is_trainable(tuple(missing.split("/")))

    return [p for p in missing_backbone_paths(params) if not trained(p)]


def save_adapter(path: str | Path, trainable: Any, method: Method, *,
                 backbone_params: Any = None, **metadata: Any) -> Path:
    """Writes the trainable tree and `method` (plus JSON-able `metadata`, e.g. the backbone
    `model` and `init_seed`) to `path/`. Scanned trees are stored per block, so an export loads
    into scanned and unscanned models alike.

    How to rebuild the backbone is recorded exactly: give `backbone_params` (the params as
    loaded, or the `frozen` part; its fingerprint `backbone_sha256` is stored and checked by
    `load_adapter`), or `backbone_sha256=backbone_fingerprint(...)` computed earlier, and/or
    `init_seed` for a `random:` model (the seed of the PRNGKey it was drawn with). A `random:`
    model with neither is refused (ValueError): it would reload onto seed 0 whatever it was.
    """
    if "init_seed" in metadata:
        check_init_seed(metadata["init_seed"], f"save_adapter({str(path)!r})")
    if backbone_params is not None:
        metadata[FINGERPRINT] = backbone_fingerprint(backbone_params, method)
    model = str(metadata.get("model") or "")
    if FINGERPRINT not in metadata:
        if is_random(model) and "init_seed" not in metadata:
            raise ValueError(
                f"save_adapter: cannot record how to rebuild the backbone {model}: pass "
                "init_seed=<the seed of the PRNGKey it was drawn with> or backbone_params="
                "params (a fingerprint load_adapter checks)")
        if not is_random(model):
            warnings.warn(f"save_adapter: {path} records the backbone by name only "
                          f"({model or 'none'}); pass backbone_params=params so that "
                          "load_adapter can verify it gets the same weights", stacklevel=2)
    return export_trainable(path, unstack_blocks(trainable),
                            {"method": method.to_dict(), **metadata})


def _describe_backbone(name: str, seed: int | None) -> str:
    return f"{name} drawn with init_seed {seed}" if is_random(name) else name


def verify_backbone(path: str | Path, meta: Mapping[str, Any], method: Method, params: Any,
                    backbone: str, init_seed: int, scan_layers: bool = False) -> None:
    """Checks the loaded `params` (backbone `backbone`, a `random:` one drawn with
    `init_seed`) against the export's record: AdapterFileError naming both backbones when the
    fingerprints differ; a warning when the export has no record (written before it existed).
    """
    recorded = meta.get(FINGERPRINT)
    trained_on = _describe_backbone(str(meta.get("model") or "an unrecorded backbone"),
                                    meta.get("init_seed", 0))
    if recorded is not None:
        got = backbone_fingerprint(params, method)
        if got != recorded:
            layout, pinned = "", ""
            if any(method.pins_frozen(k) for k in traverse_util.flatten_dict(dict(params))):
                pinned = f" (or {method.name}'s frozen inputs loaded from elsewhere changed)"
            drawn_scanned = meta.get("scan_layers")
            if is_random(backbone) and drawn_scanned not in (None, scan_layers):
                layout = (f" A random backbone drawn with scan_layers={drawn_scanned} (as this "
                          f"one was) differs from one drawn with scan_layers={scan_layers}: "
                          f"pass scan_layers={drawn_scanned}.")
            raise AdapterFileError(
                f"{path}: the adapter was trained on {trained_on} (backbone {recorded}), but "
                f"the backbone loaded is {_describe_backbone(backbone, init_seed)} ({got}): "
                f"its weights differ{pinned}.{layout} Load it onto the backbone it was trained on "
                "(pass backbone=<that checkpoint>), or re-export it with save_adapter(..., "
                "init_seed=<the seed it was drawn with>)")
    elif not (is_random(backbone) and "init_seed" in meta):
        warnings.warn(
            f"{path}: the export does not record its backbone's fingerprint (written before "
            f"exports recorded it): loaded onto {_describe_backbone(backbone, init_seed)} "
            "unverified; re-export it with save_adapter(..., backbone_params=params)",
            stacklevel=3)


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
    """(model, params): `backbone` (checkpoint dir, Hub id or `random:<preset>`;
    default: the model recorded in the export) with the exported parameters put in place;
    `params` is what the model is applied with (`method.combine(trainable, frozen)`).
    A `random:` backbone is drawn from the export's `init_seed` (default 0), as in training,
    and cut to the export's `vocab_size` when it records one.

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
    # A run on a vocabulary cut to its tokenizer (`vocab_size` recorded) is put back on the
    # same cut backbone.
    vocab_size = meta.get("vocab_size")
    model, params = peft_model.from_pretrained(
        backbone, method, rng, dtype=dtype, scan_layers=scan_layers,
        vocab_size=int(vocab_size) if vocab_size is not None else None)
    verify_backbone(path, meta, method, params, backbone, int(meta.get("init_seed", 0)),
                    scan_layers)
    trainable, frozen = method.partition(params)
    fitted = fit_export(trained, trainable, path=path, backbone=backbone, method=method,
                        scan_layers=scan_layers)
    return model, method.combine(fitted, frozen)


def fit_export(trained: Any, template: Any, *, path: str | Path, backbone: str,
               method: Method, scan_layers: bool = False) -> dict:
    """An export's tree put in the model's layout: `trained` (as `load_trainable` returns it,
    blocks unstacked) checked against `template` (the model's trainable tree, arrays or
    ShapeDtypeStructs: the first part of `method.partition`), cast to its dtypes and stacked
    when `scan_layers`.

    Returns:
      the trainable tree to combine with the frozen one (`method.combine`).
    Raises:
      AdapterFileError naming `path`, `backbone` and `method` for a missing or unexpected
      tensor, or naming the parameter (per block) for a shape mismatch.
    """
    # Compared block by block, as exported: a partial export cannot be stacked.
    layout = jax.eval_shape(unstack_blocks, template) if scan_layers else template
    want = traverse_util.flatten_dict(layout)
    got = traverse_util.flatten_dict(trained)
    missing = sorted("/".join(k) for k in set(want) - set(got))
    extra = sorted("/".join(k) for k in set(got) - set(want))
    if missing or extra:
        raise AdapterFileError(
            f"{path}: the export does not fit {backbone} with method {method.name} "
            f"(scan_layers={scan_layers}): missing {missing[:5]}, unexpected {extra[:5]}")
    for key, value in got.items():
        if tuple(want[key].shape) != tuple(np.shape(value)):
            raise AdapterFileError(f"{path}: parameter {'/'.join(key)} has shape "
                                   f"{np.shape(value)}, the model expects {want[key].shape}")
        want[key] = jnp.asarray(value, dtype=want[key].dtype)
    fitted = traverse_util.unflatten_dict(want)
    return stack_blocks(fitted) if scan_layers else fitted
