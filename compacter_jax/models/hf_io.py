"""Load/save HF PyTorch T5 checkpoints (config.json + safetensors) without torch.

Key mapping (torch Linear weights are [out, in]; Flax kernels [in, out]):

    shared.weight                    shared/embedding
    S.block.{i}.layer.{j}.A.q.weight  S/block_{i}/layer_{j}/A/q/kernel   (T; A: SelfAttention,
                                      EncDecAttention, DenseReluDense with wi|wi_0|wi_1|wo)
    S.block.{i}.layer.{j}.layer_norm.weight          S/block_{i}/layer_{j}/layer_norm/scale
    S.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                     S/relative_attention_bias/embedding
    S.final_layer_norm.weight        S/final_layer_norm/scale
    lm_head.weight                   lm_head/kernel (T; untied models only)

(S = encoder | decoder; T = transposed.)

With scan_layers the blocks are `{stack}/blocks/...` with a leading layer axis (stacked here).
Parameters that have no HF key (PEFT modules from hooks) are freshly initialised.

Where a model comes from: a local directory; a backbone shipped with the package by folder name
(`t5-mini-glue`, `compacter_jax.paths.checkpoints_dir()`); else a Hub repo id (the short names
of `HUB_IDS` map to google's repos), downloaded into the HF cache on first use
(`compacter_jax.hub`: revision pinning, HF_HUB_OFFLINE / local_files_only respected). Every
folder is untrusted input: config.json sizes are bounded before anything is traced, every
file an index names stays inside the folder, and only safetensors are read (no pickles).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from compacter_jax import hub
from compacter_jax.atomic import atomic_write
from compacter_jax.host import nonfinite_leaves, param_count
from compacter_jax.models.config import (PRESETS, T5Config, backbone_param_count,
                                         parse_model_spec)
from compacter_jax.models.hooks import NO_HOOKS, T5Hooks
from compacter_jax.models.t5 import T5ForConditionalGeneration
from compacter_jax.paths import inside

Path_ = tuple[str, ...]
_BLOCK = re.compile(r"block_(\d+)$")
_PROJ_PARENTS = ("SelfAttention", "EncDecAttention", "DenseReluDense")
# Checkpoint keys that duplicate or are unused by a loaded model.
_IGNORED = re.compile(
    r"(encoder|decoder)\.embed_tokens\.weight$"
    r"|decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$")


def flax_path_to_hf(path: Path_) -> tuple[str, bool] | None:
    """(HF key, transpose?) of an unscanned Flax param path, or None for non-backbone params."""
    if path == ("shared", "embedding"):
        return "shared.weight", False
    if path == ("lm_head", "kernel"):
        return "lm_head.weight", True
    if len(path) < 3 or path[0] not in ("encoder", "decoder"):
        return None
    stack, rest = path[0], path[1:]
    if rest == ("relative_attention_bias", "embedding"):
        return f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False
    if rest == ("final_layer_norm", "scale"):
        return f"{stack}.final_layer_norm.weight", False
    m = _BLOCK.match(rest[0])
    if not m or not rest[1].startswith("layer_"):
        return None
    prefix = f"{stack}.block.{m.group(1)}.layer.{rest[1][len('layer_'):]}"
    tail = rest[2:]
    if tail == ("layer_norm", "scale"):
        return f"{prefix}.layer_norm.weight", False
    if len(tail) == 3 and tail[0] in _PROJ_PARENTS and tail[2] == "kernel":
        return f"{prefix}.{tail[0]}.{tail[1]}.weight", True
    return None


def _layer_paths(path: Path_, n_layers: int) -> list[Path_] | None:
    """Per-layer unscanned paths of a scanned path `{stack}/blocks/...`, else None."""
    if len(path) > 2 and path[0] in ("encoder", "decoder") and path[1] == "blocks":
        return [(path[0], f"block_{i}") + path[2:] for i in range(n_layers)]
    return None


def _num_layers(config: T5Config, stack: str) -> int:
    return config.num_layers if stack == "encoder" else config.num_decoder_layers


def is_backbone_path(path: Path_, config: T5Config | None = None) -> bool:
    """True if the (scanned or unscanned) param path is a T5 weight stored in HF checkpoints;
    everything else in a model's tree was inserted by hooks (PEFT parameters). `config` is
    accepted for backwards compatibility and not needed."""
    per_layer = _layer_paths(path, 1)
    return flax_path_to_hf(per_layer[0] if per_layer else path) is not None


# Weights every T5 of this library holds, whatever its size, layout (scanned or not) or tying.
CORE_BACKBONE_PATHS: tuple[Path_, ...] = (
    ("shared", "embedding"),
    ("encoder", "relative_attention_bias", "embedding"), ("encoder", "final_layer_norm", "scale"),
    ("decoder", "relative_attention_bias", "embedding"), ("decoder", "final_layer_norm", "scale"))


def missing_backbone_paths(params: Any) -> list[str]:
    """The T5 weights a tree of `T5ForConditionalGeneration` holds but `params` lacks ('/'-
    joined; `CORE_BACKBONE_PATHS` and the layers of each stack), [] for such a tree. Works on
    arrays or ShapeDtypeStructs, scanned or not."""
    paths = set(traverse_util.flatten_dict(dict(params)))
    missing = ["/".join(p) for p in CORE_BACKBONE_PATHS if p not in paths]
    for stack in ("encoder", "decoder"):
        if not any(p[0] == stack and len(p) > 2 and (p[1] == "blocks" or _BLOCK.match(p[1]))
                   and is_backbone_path(p) for p in paths):
            missing.append(f"{stack}/block_<i>/layer_<j>/... (the {stack}'s layers)")
    return missing


def params_to_hf_state_dict(params: Any, config: T5Config) -> dict[str, np.ndarray]:
    """Backbone params (scanned or not) -> HF state dict of numpy arrays (PEFT params dropped)."""
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(jax.device_get(value))
        per_layer = _layer_paths(path, _num_layers(config, path[0]))
        items = zip(per_layer, value) if per_layer else [(path, value)]
        for p, v in items:
            hf = flax_path_to_hf(p)
            if hf is not None:
                key, transpose = hf
                out[key] = np.ascontiguousarray(v.T if transpose else v)
    return out


def stack_blocks(params: Any) -> dict:
    """Unscanned params (`{stack}/block_{i}/...`) -> scanned (`{stack}/blocks/...`, layer axis 0).

    Applies to every leaf of the blocks, PEFT params included.
    """
    out = dict(params)
    for stack in ("encoder", "decoder"):
        if stack not in params:
            continue
        sub = dict(params[stack])
        blocks = sorted((int(m.group(1)), k) for k in sub if (m := _BLOCK.match(k)))
        if blocks:
            layers = [sub.pop(k) for _, k in blocks]
            sub["blocks"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        out[stack] = sub
    return out


def unstack_blocks(params: Any) -> dict:
    """Inverse of `stack_blocks`: `{stack}/blocks/...` -> `{stack}/block_{i}/...`."""
    out = dict(params)
    for stack in ("encoder", "decoder"):
        if stack not in params or "blocks" not in params[stack]:
            continue
        sub = dict(params[stack])
        blocks = sub.pop("blocks")
        n = jax.tree_util.tree_leaves(blocks)[0].shape[0]
        for i in range(n):
            sub[f"block_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], blocks)
        out[stack] = sub
    return out


class _Checkpoint:
    """Lazy reader over one safetensors file or a sharded index."""

    def __init__(self, directory: Path):
        single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
        if single.is_file():
            files = [inside(directory, single.name, str(directory))]
            self.where = None
        elif index.is_file():
            inside(directory, index.name, str(directory))
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                    AttributeError) as e:
                raise ValueError(f"corrupt checkpoint index {index}: {e!r}") from None
            for name in names:
                if not isinstance(name, str) or not name.endswith(".safetensors"):
                    raise ValueError(f"{index} names {name!r}: only .safetensors files are read "
                                     "(PyTorch pickles are refused: they can run code)")
            files = [inside(directory, name, str(index)) for name in names]
            self.where = {k: directory / f for k, f in weight_map.items()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {directory} "
                "(PyTorch .bin checkpoints are not supported: re-save with safetensors)")
        self.handles = {}
        for f in files:
            try:
                self.handles[f] = safe_open(str(f), framework="numpy")
            except (SafetensorError, OSError, ValueError) as e:
                raise ValueError(f"cannot read safetensors file {f} (corrupt or truncated?): "
                                 f"{e}") from e
        self.keys: dict[str, tuple[Path, str]] = {}  # key -> (file, key stored in the file)
        for f, h in self.handles.items():
            for k in h.keys():
                self.keys[k] = (f, k)

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def num_weights(self) -> int:
        """Number of stored values, from the files' headers (no tensor is read)."""
        return sum(int(np.prod(self.handles[f].get_slice(k).get_shape(), dtype=np.int64))
                   for f, k in self.keys.values())

    def get(self, key: str) -> np.ndarray:
        f, stored = self.keys[key]
        try:
            return self.handles[f].get_tensor(stored)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"cannot read tensor {key!r} from {f} (corrupt file?): {e}") from e


# A Hub model that is not in the local cache while the Hub cannot be reached (offline mode,
# local_files_only, no connection): the one failure a caller may answer with a fallback.
ModelNotCachedError = hub.HubUnreachableError


def model_dir(name_or_path: str, *, revision: str | None = None,
              local_files_only: bool = False) -> Path | None:
    """The local folder of a model (None for `random:<preset>`): a directory as given, a
    backbone shipped with the package by name (`t5-mini-glue`), else the Hub repo (short names
    from `HUB_IDS`) downloaded into the HF cache when missing.

    Raises:
      FileNotFoundError for a missing local path; `compacter_jax.hub`'s errors for a Hub repo
      (HubUnreachableError = ModelNotCachedError, HubNotFoundError, HubAccessError).
    """
    if parse_model_spec(name_or_path).kind == "random":
        return None
    return _resolve_dir(name_or_path, revision, local_files_only)


def _resolve_dir(name_or_path: str, revision: str | None, local_files_only: bool,
                 files: tuple[str, ...] = hub.MODEL_FILES) -> Path:
    kind, where = parse_model_spec(name_or_path)
    if kind == "path" and not where.is_dir():
        raise FileNotFoundError(f"{name_or_path} is not a directory with config.json "
                                f"({'a file' if where.exists() else 'no such directory'})")
    if kind in ("path", "shipped"):                                 # shipped: "t5-mini-glue"
        return where
    return hub.snapshot(hub.repo_id_of(where), revision=revision,
                        local_files_only=local_files_only, allow_patterns=files)


def _load_config(directory: Path, **runtime: Any) -> T5Config:
    cfg_file = directory / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"missing {cfg_file}: a T5 checkpoint directory needs config.json")
    inside(directory, cfg_file.name, str(directory))
    try:
        d = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt {cfg_file}: not valid JSON ({e})") from None
    try:
        return T5Config.from_hf_dict(d, **runtime)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}; fix the file or re-save the checkpoint") from None


def load_config(name_or_path: str, *, revision: str | None = None,
                local_files_only: bool = False, check_weights: bool = False) -> T5Config:
    """The `T5Config` of a local checkpoint dir, a Hub id (only its config.json is downloaded
    unless `check_weights`) or `random:<preset>`, without reading any weights (a cheap check
    before a run).
    `check_weights=True` also opens the weight files' headers (no tensor is read), so a
    checkpoint without weights, with a truncated header or with fewer weights than config.json
    describes fails here too.

    Raises FileNotFoundError (ModelNotCachedError: a Hub id neither cached nor reachable) or
    ValueError naming the file and field, as `from_pretrained` would.
    """
    kind, preset = parse_model_spec(name_or_path)
    if kind == "random":
        return PRESETS[preset]
    directory = _resolve_dir(name_or_path, revision, local_files_only,
                             hub.MODEL_FILES if check_weights else ("config.json",))
    config = _load_config(directory)
    if check_weights:
        _check_weight_count(_Checkpoint(directory), config, directory)
    return config


def init_fn(model: T5ForConditionalGeneration):
    """`rng -> params` of `model` (all of them, backbone and hooks), on a dummy batch."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return lambda rng: model.init(rng, ids, jnp.ones_like(ids), ids)["params"]


def param_shapes(model: T5ForConditionalGeneration, rng: jax.Array | None = None) -> dict:
    """The param tree of `model` as `jax.ShapeDtypeStruct`s (no memory allocated)."""
    return jax.eval_shape(init_fn(model), jax.random.PRNGKey(0) if rng is None else rng)


def _run_once(fn, *args):
    """jit-compiles `fn` and runs it once (parameter init).

    XLA:CPU spends most of an init's compile time optimising its many RNG kernels
    (~0.5 s per leaf). For small outputs (< 20M numbers: tiny test models, PEFT params)
    unoptimised code compiles ~5x faster and runs fast enough; values then differ from the
    optimised build by float rounding only (~1 ulp).
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
        return fn(*args)  # already inside a trace (jit, eval_shape): just trace through
    out = jax.eval_shape(fn, *args)
    size = param_count(out)
    options = {"xla_backend_optimization_level": 0} if size < 20_000_000 else None
    return jax.jit(fn).lower(*args).compile(compiler_options=options)(*args)


def init_params(model: T5ForConditionalGeneration, rng: jax.Array) -> dict:
    """Random params of `model` (all of them, backbone and PEFT)."""
    return _run_once(init_fn(model), rng)


def _init_subset(model: T5ForConditionalGeneration, rng: jax.Array,
                 paths: list[Path_]) -> dict[Path_, jax.Array]:
    """Initialises only the given leaves; XLA drops the rest of the init (cheap to compile)."""
    init = init_fn(model)

    def f(r):
        flat = traverse_util.flatten_dict(init(r))
        return {"/".join(p): flat[p] for p in paths}

    out = _run_once(f, rng) if paths else {}
    return {p: out["/".join(p)] for p in paths}


def init_hook_params(model: T5ForConditionalGeneration, rng: jax.Array) -> dict:
    """Freshly initialised params of `model` that are not T5 backbone weights (PEFT params)."""
    abstract = traverse_util.flatten_dict(jax.eval_shape(init_fn(model), rng))
    paths = [p for p in abstract if not is_backbone_path(p)]
    return traverse_util.unflatten_dict(_init_subset(model, rng, paths))


def from_pretrained(name_or_path: str, *, hooks: T5Hooks = NO_HOOKS, dtype: str = "float32",
                    param_dtype: str = "float32", scan_layers: bool = False, remat: bool = False,
                    rng: jax.Array | None = None, revision: str | None = None,
                    local_files_only: bool = False, vocab_size: int | None = None
                    ) -> tuple[T5ForConditionalGeneration, dict]:
    """(model, params) from a local HF checkpoint dir, a shipped backbone (`t5-mini-glue`), a
    Hub id or `random:<preset>`.

    A Hub id (e.g. "t5-base", "google/flan-t5-base") is downloaded into the HF cache when not
    there, at `revision` (branch, tag or commit; default "main"); `local_files_only=True` or
    HF_HUB_OFFLINE=1 never touches the network. Every backbone param comes from the
    checkpoint; params of `hooks` are initialised with `rng` (default PRNGKey(0)).
    `vocab_size` (e.g. len(tokenizer)) cuts the vocabulary to its first entries before the
    hooks' params are made, as HF `resize_token_embeddings` (`compacter_jax.models.vocab`); a
    random backbone is drawn at full size, then cut. Errors name the repo and the cause
    (`compacter_jax.hub`), or the file and the missing key / bad shape / out-of-bounds
    config.json field.
    """
    from compacter_jax.models import vocab  # noqa: PLC0415 (vocab.py uses is_backbone_path)

    rng = jax.random.PRNGKey(0) if rng is None else rng
    runtime = dict(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)
    kind, preset = parse_model_spec(name_or_path)
    if kind == "random":
        model = T5ForConditionalGeneration(PRESETS[preset].replace(**runtime), hooks)
        if vocab_size is None:
            return model, init_params(model, rng)
        return _random_resized(model, rng, vocab_size)

    directory = _resolve_dir(name_or_path, revision, local_files_only)
    config = _load_config(directory, **runtime)
    ckpt = _Checkpoint(directory)
    _check_weight_count(ckpt, config, directory)
    if "shared.weight" not in ckpt and "encoder.embed_tokens.weight" in ckpt:
        ckpt.keys["shared.weight"] = ckpt.keys["encoder.embed_tokens.weight"]
    # transformers 5 writes tie_word_embeddings=true even for untied models: a distinct
    # lm_head.weight in the file is what makes a model untied.
    if "lm_head.weight" in ckpt and config.tie_word_embeddings:
        if not np.array_equal(ckpt.get("lm_head.weight"), _get(ckpt, "shared.weight")):
            config = config.replace(tie_word_embeddings=False)
    if vocab_size is not None:
        vocab.check_vocab_size(config, vocab_size)
        config = config.replace(vocab_size=vocab_size)
    model = T5ForConditionalGeneration(config, hooks)
    try:
        abstract = traverse_util.flatten_dict(jax.eval_shape(init_fn(model), rng))
    except Exception:
        # A hook may refuse the config (e.g. PHM divisibility) when the real problem is that
        # config.json does not describe the weights: report the mismatch if there is one.
        _check_backbone_shapes(ckpt, config, directory)
        raise

    loaded: dict[Path_, Any] = {}
    fresh: list[Path_] = []
    used: set[str] = set()
    for path, spec in abstract.items():
        if not is_backbone_path(path):
            fresh.append(path)
            continue
        per_layer = _layer_paths(path, _num_layers(config, path[0]))
        arrays = []
        for p in per_layer or [path]:
            key, transpose = flax_path_to_hf(p)
            arr = _get(ckpt, key)
            if key in ("shared.weight", "lm_head.weight") and vocab_size is not None:
                arr = arr[:vocab_size]  # HF resize_token_embeddings: the first rows
            arr = arr.T if transpose else arr
            arrays.append(arr)
            used.add(key)
            _check_shape(key, arr, spec.shape[1:] if per_layer else spec.shape, transpose,
                         directory)
            _check_finite(key, arr, ckpt)
        value = np.stack(arrays) if per_layer else arrays[0]
        loaded[path] = jnp.asarray(value, dtype=spec.dtype)
    unexpected = sorted(k for k in ckpt.keys if k not in used and not _IGNORED.search(k)
                        and not (k == "lm_head.weight" and config.tie_word_embeddings))
    if unexpected:
        warnings.warn(f"{directory}: checkpoint keys not used by the model: {unexpected[:10]}")
    if fresh:
        loaded.update(_init_subset(model, rng, fresh))
    return model, traverse_util.unflatten_dict(loaded)


def _check_weight_count(ckpt: "_Checkpoint", config: T5Config, directory: Path) -> None:
    """A config.json describing far more weights than the files hold (a corrupt or hostile
    file) fails here, before the model is traced; a small shortfall is left to the per-key
    checks, which name the missing weight."""
    described, stored = backbone_param_count(config), ckpt.num_weights()
    if described > 2 * stored:
        raise ValueError(
            f"{directory / 'config.json'} describes {described:,} weights (d_model="
            f"{config.d_model}, d_ff={config.d_ff}, num_layers={config.num_layers}, "
            f"num_decoder_layers={config.num_decoder_layers}, vocab_size={config.vocab_size}) "
            f"but the weight files hold {stored:,}: config.json does not match the weights")


def _random_resized(model: T5ForConditionalGeneration, rng: jax.Array, vocab_size: int
                    ) -> tuple[T5ForConditionalGeneration, dict]:
    """A random backbone drawn as at full size (same values), cut to `vocab_size`, with the
    hooks' params made for the cut model."""
    full = traverse_util.flatten_dict(init_params(model, rng))
    backbone = traverse_util.unflatten_dict(
        {p: v for p, v in full.items() if is_backbone_path(p)})
    from compacter_jax.models.vocab import resize_token_embeddings  # noqa: PLC0415

    backbone, config = resize_token_embeddings(backbone, model.config, vocab_size)
    resized = T5ForConditionalGeneration(config, model.hooks)
    abstract = traverse_util.flatten_dict(jax.eval_shape(init_fn(resized), rng))
    fresh = [p for p in abstract if not is_backbone_path(p)]
    flat = traverse_util.flatten_dict(backbone)
    if fresh:
        flat.update(_init_subset(resized, rng, fresh))
    return resized, traverse_util.unflatten_dict(flat)


def _check_shape(key: str, arr: np.ndarray, expected: tuple[int, ...], transpose: bool,
                 directory: Path) -> None:
    if tuple(arr.shape) != tuple(expected):
        found = arr.T.shape if transpose else arr.shape
        want = tuple(reversed(expected)) if transpose else tuple(expected)
        raise ValueError(f"shape mismatch for {key!r} in {directory}: expected {want} from "
                         f"config.json, found {tuple(found)} (config.json does not match the "
                         "weights?)")


def _check_finite(key: str, arr: np.ndarray, ckpt: "_Checkpoint") -> None:
    """Corrupt weights (NaN/inf) would surface as a NaN loss blamed on the learning rate."""
    if nonfinite_leaves({key: arr}):
        bad = int(arr.size - np.isfinite(arr).sum())
        raise ValueError(f"checkpoint weight {key!r} in {ckpt.keys[key][0]} holds {bad} "
                         "NaN/inf values: the file is corrupt; re-download or re-save it")


def _check_backbone_shapes(ckpt: "_Checkpoint", config: T5Config, directory: Path) -> None:
    """Raises the first shape mismatch between the checkpoint and `config` (plain T5)."""
    plain = T5ForConditionalGeneration(config.replace(scan_layers=False), NO_HOOKS)
    abstract = traverse_util.flatten_dict(jax.eval_shape(init_fn(plain), jax.random.PRNGKey(0)))
    for path, spec in abstract.items():
        key, transpose = flax_path_to_hf(path)
        if key in ckpt:
            arr = ckpt.get(key)
            _check_shape(key, arr.T if transpose else arr, spec.shape, transpose, directory)


def _get(ckpt: _Checkpoint, key: str) -> np.ndarray:
    if key not in ckpt:
        raise ValueError(f"checkpoint is missing weight {key!r} (files: "
                       f"{sorted({str(f) for f in ckpt.handles})}); config.json and the weights "
                       "do not match")
    return ckpt.get(key)


def save_pretrained(path: str | os.PathLike, config: T5Config, params: Any) -> Path:
    """Writes config.json + model.safetensors (backbone only) loadable by HF transformers.

    Tied models store only shared.weight; untied ones also lm_head.weight. Returns the dir.
    """
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    state = params_to_hf_state_dict(params, config)
    missing = [k for k in ("shared.weight",) + (() if config.tie_word_embeddings
                                                else ("lm_head.weight",)) if k not in state]
    if missing:
        raise ValueError(f"params lack backbone weights {missing}; pass the full param tree")
    # safetensors writes 0600; atomic_write gives the file the mode a plain open() gives.
    atomic_write(out / "model.safetensors",
                 lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    text = json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write(out / "config.json", text)
    return out
