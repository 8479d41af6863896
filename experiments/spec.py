"""What a run's config may hold, checked once, up front, before any corpus, backbone or compiled
program: a field the run does not know (naming the valid ones), a missing field, and a value it
cannot use are each one `ConfigError` naming `--config.<field>`, the value and the fix (the CLIs
exit 2 on it). Configs are data (`experiments/configs/*.py`); their schema is here.

    check_fields(config, glue_defaults())        # every run: unknown / missing fields
    spec = pretrain_spec(config)                 # pretraining: checked, sentinels resolved

Fine-tuning and multi-task values are checked by `validate_config` (after `check_fields`),
and `finetune_spec` resolves their sentinels; pretraining's by `pretrain_spec`. Both return
the values typed, every sentinel (`-1` / `""` / `0` / None meaning "unset") resolved.

(One file for the schema of all three runs, so that a rule is written once; sections:
fields, value checks, fine-tuning, pretraining.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.data.sources import SOURCE_KINDS
from compacter_jax.models import hf_io
from compacter_jax.models.config import MAX_PARAMS, MAX_SIZES, T5Config, backbone_param_count
from compacter_jax.train.optim import OPTIMIZERS
from experiments.evaluation import EVAL_MODES


class ConfigError(ValueError):
    """A config field with a value the run cannot use; the message names `--config.<field>`."""


def flag(field: str, value: Any) -> str:
    return f"--config.{field}={value!r}"


_flag = flag


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


def _available_memory() -> int | None:
    """Bytes of memory of the first JAX device (its allocator's limit on an accelerator, the
    machine's physical memory on CPU); None when unknown."""
    import jax  # noqa: PLC0415

    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


# Training a parameter costs its float32 value, gradient and two AdamW moments, at least.
BYTES_PER_TRAINED_PARAM = 16
MODEL_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon",
                "feed_forward_proj", "tie_word_embeddings", "scale_decoder_outputs")


def check_model_sizes(model: Mapping[str, Any], vocab_size: int, *,
                      memory: int | None = None) -> int:
    """Refuses a `--config.model.<field>` the T5 does not have, a size out of the package's
    bounds (`models.config.MAX_SIZES`), and a model whose training state cannot fit in
    `memory` bytes (default: the first device's).

    Returns:
      the number of backbone parameters.
    """
    for key in model.keys():
        if key not in MODEL_FIELDS:
            raise ConfigError(f"--config.model.{key}: config.model has no field {key!r}; "
                              f"valid fields: {', '.join(MODEL_FIELDS)}")
    for key, limit in MAX_SIZES.items():
        if key not in model:
            continue
        value = model[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
                1 <= value <= limit):
            raise ConfigError(f"{flag('model.' + key, value)}: must be an integer in "
                              f"1..{limit:,}")
    sizes = {**dataclasses.asdict(T5Config()), **dict(model), "vocab_size": max(vocab_size, 1)}
    total = backbone_param_count(sizes)
    memory = _available_memory() if memory is None else memory
    need = total * BYTES_PER_TRAINED_PARAM
    if total > MAX_PARAMS or (memory is not None and need > memory):
        fields = ", ".join(f"{k}={sizes[k]}" for k in ("d_model", "d_ff", "num_layers",
                                                      "num_decoder_layers", "vocab_size"))
        raise ConfigError(
            f"--config.model ({fields}) has {total:,} parameters: training needs about "
            f"{need / 2**30:.3g} GiB, more than the {(memory or 0) / 2**30:.3g} GiB of this "
            "device; use smaller --config.model.* sizes")
    return total


# --------------------------------------------------------------------------- fine-tuning

FLOAT32_MAX = float(np.finfo(np.float32).max)
STRATEGIES = ("jit", "pmap")
DTYPES = ("float32", "bfloat16")
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


def _check_int(config, field: str, ok: Callable[[int], bool], want: str) -> None:
    if field not in config:
        return
    value = config[field]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{_flag(field, value)}: expected an integer, {want}")
    if not ok(int(value)):
        raise ConfigError(f"{_flag(field, value)}: must be {want}")


def _check_float(config, field: str, ok: Callable[[float], bool], want: str,
                 optional: bool = False) -> None:
    if field not in config:
        return
    value = config[field]
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ConfigError(f"{_flag(field, value)}: expected a number, {want}")
    if not math.isfinite(float(value)) or not ok(float(value)):
        raise ConfigError(f"{_flag(field, value)}: must be {want}")


def _check_choice(config, field: str, choices: tuple[str, ...]) -> None:
    if field in config and config[field] not in choices:
        raise ConfigError(f"{_flag(field, config[field])}: use one of {', '.join(choices)}")


def _positive(v):
    return v >= 1


def _minus_one_or_positive(v):
    return v == -1 or v >= 1


def validate_config(config, *, available_devices: int | None = None,
                    processes: int = 1) -> None:
    """Raises ConfigError for the first field a fine-tuning (or multi-task) run cannot use.

    Args:
      config: an `ml_collections.ConfigDict` (or mapping) with the fields of
        `experiments/configs/glue.py` (multi-task: without `task`).
      available_devices: the number of JAX devices (`len(jax.devices())`, all processes) to
        check `num_devices` and the batch split against; None skips those checks (call
        before `jax.distributed` is initialised).
      processes: `jax.process_count()`.
    Raises:
      ConfigError (a ValueError) naming the flag, its value and the fix.
    """
    method = _check_what_to_train(config)
    _check_sources(config)
    _check_schedule(config)
    _check_processes(config)
    _check_dp(config)
    if available_devices is not None:
        packing = config.get("packing")
        _check_devices(config, available_devices, processes,
                       padded=packing is False or (packing is None and not method.packable))


def _check_what_to_train(config) -> peft.Method:
    """Names are checked against the registries (which list the valid ones)."""
    if "task" in config:
        try:
            data_lib.get_task(config["task"])
        except ValueError as e:
            raise ConfigError(f"--config.task: {e}") from None
    overrides = {k: v for k, v in config["peft"].items() if v is not None} if "peft" in config \
        else {}
    try:
        method = peft.get_method(config["method"])
    except ValueError as e:
        raise ConfigError(f"--config.method: {e}") from None
    try:
        method.replace(**overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--config.peft: {e}") from None
    if "model" in config and (not isinstance(config["model"], str)
                              or not config["model"].strip()):
        raise ConfigError(f"{_flag('model', config['model'])}: name a local HF checkpoint "
                          "directory, a Hub id or random:<preset>")
    return method


def _check_sources(config) -> None:
    _check_choice(config, "source", SOURCE_KINDS)
    _check_choice(config, "dtype", DTYPES)
    _check_choice(config, "strategy", STRATEGIES)
    _check_choice(config, "eval_mode", EVAL_MODES)
    if config.get("shard_frozen") and config.get("strategy") == "pmap":
        raise ConfigError("--config.shard_frozen=True needs --config.strategy=jit (pmap "
                          "replicates every leaf)")
    if config.get("download") and config.get("source") == "files":
        raise ConfigError("--config.download=True only applies to --config.source=tfds or "
                          "auto")
    data_dir = config.get("data_dir")
    if data_dir and not config.get("download") and not Path(data_dir).expanduser().is_dir():
        raise ConfigError(f"{_flag('data_dir', data_dir)}: no such directory; point it at the "
                          "folder of GLUE/SuperGLUE files (or of prepared TFDS data), or leave "
                          "it empty for $COMPACTER_DATA_DIR")


def _check_schedule(config) -> None:
    """Sizes, schedule and optimizer."""
    for field in ("batch_size", "eval_batch_size", "max_source_length", "log_every",
                  "keep_checkpoints"):
        _check_int(config, field, _positive, "a positive integer")
    for field in ("max_target_length", "epochs", "max_steps", "train_samples",
                  "max_eval_samples"):
        _check_int(config, field, _minus_one_or_positive, "-1 (the default) or a positive "
                   "integer")
    _check_int(config, "warmup_steps", lambda v: v >= 0, "0 or more")
    _check_int(config, "eval_every", lambda v: v >= -1,
               "-1 (once per epoch), 0 (never) or a number of steps")
    _check_int(config, "save_every", lambda v: v >= -1,
               "-1 (at every evaluation) or a number of steps")
    for field in ("seed", "data_seed"):  # PRNGKey and numpy seeds are unsigned 32-bit
        _check_int(config, field, lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1")
    _check_float(config, "learning_rate", lambda v: 0 < v <= FLOAT32_MAX,
                 "a positive finite float32 (e.g. 3e-3); leave it unset for the method's "
                 "rate", optional=True)
    _check_float(config, "weight_decay", lambda v: v >= 0, "0 or more")
    _check_float(config, "clip_norm", lambda v: v >= 0, "0 (no clipping) or more")
    _check_choice(config, "optimizer", OPTIMIZERS)
    resize = config.get("resize_vocab_to_tokenizer", False)
    if not isinstance(resize, bool):
        raise ConfigError(f"{_flag('resize_vocab_to_tokenizer', resize)}: expected True or "
                          "False")


def _check_processes(config) -> None:
    """Parallelism and processes."""
    _check_int(config, "num_devices", lambda v: v == -1 or v >= 1,
               "-1 (all devices) or a positive integer")
    _check_int(config, "num_processes", _minus_one_or_positive,
               "-1 (unset) or the number of processes")
    _check_int(config, "process_id", lambda v: v >= -1, "-1 (unset) or this process's index")
    if config.get("num_processes", -1) > 0 and config.get("process_id", -1) >= \
            config["num_processes"]:
        raise ConfigError(f"{_flag('process_id', config['process_id'])}: must be below "
                          f"--config.num_processes={config['num_processes']}")
    address = config.get("coordinator_address", "")
    if address and not _ADDRESS.match(address):
        raise ConfigError(f"{_flag('coordinator_address', address)}: expected host:port of "
                          "process 0, e.g. 10.0.0.2:1234")


def dp_enabled(config) -> bool:
    """True when the config asks for differentially private training (`--config.dp.*`)."""
    dp = config.get("dp")
    return dp is not None and (dp.get("noise_multiplier") is not None
                               or dp.get("epsilon") is not None)


def _check_dp(config) -> None:
    if not dp_enabled(config):
        return
    dp = {f"dp.{k}": v for k, v in config["dp"].items()}  # flags named --config.dp.<field>
    if dp.get("dp.noise_multiplier") is not None and dp.get("dp.epsilon") is not None:
        raise ConfigError(f"{_flag('dp.noise_multiplier', dp['dp.noise_multiplier'])} and "
                          f"{_flag('dp.epsilon', dp['dp.epsilon'])}: set one (the noise, or the "
                          "target epsilon the noise is calibrated for), not both")
    _check_float(dp, "dp.noise_multiplier", lambda v: v > 0, "> 0 (noise 0 gives no privacy: "
                 "epsilon is infinite); e.g. 1.0", optional=True)
    _check_float(dp, "dp.epsilon", lambda v: v > 0, "a positive target epsilon, e.g. 3 or 8",
                 optional=True)
    _check_float(dp, "dp.clip_norm", lambda v: v > 0, "a positive per-example gradient norm "
                 "bound, e.g. 1.0")
    _check_float(dp, "dp.delta", lambda v: 0 < v < 1, "in (0, 1), below 1 / (training "
                 "examples); leave it unset for 1 / N**1.1", optional=True)
    _check_int(dp, "dp.microbatch_size", _minus_one_or_positive, "-1 (all examples of the batch "
               "at once) or a positive number of examples")
    from compacter_jax.train.privacy import ACCOUNTANTS  # noqa: PLC0415 (DP runs only)
    if dp.get("dp.accountant") not in ACCOUNTANTS:
        raise ConfigError(f"{_flag('dp.accountant', dp.get('dp.accountant'))}: use one of "
                          f"{', '.join(ACCOUNTANTS)}")
    if config.get("packing"):
        raise ConfigError("--config.packing=True with --config.dp: DP clips each example's "
                          "gradient, and a packed row mixes several examples; set "
                          "--config.packing=False (or leave it unset: DP runs use padded "
                          "batches)")


def _check_devices(config, available: int, processes: int, padded: bool) -> None:
    requested = config.get("num_devices", -1)
    if requested > available:
        raise ConfigError(f"{_flag('num_devices', requested)}: only {available} device(s) "
                          "are available; use -1 for all of them or a smaller number")
    if processes > 1 and requested not in (-1, available):
        raise ConfigError(f"{_flag('num_devices', requested)}: a run of {processes} processes "
                          f"uses all their {available} devices; leave it at -1")
    used = available if requested == -1 else requested
    # Packed batches get a multiple of the devices in rows; padded ones have batch_size rows.
    if padded and config["batch_size"] % used:
        raise ConfigError(f"{_flag('batch_size', config['batch_size'])} is not divisible by "
                          f"the {used} devices the batch is split over; use a multiple of "
                          f"{used} or set --config.num_devices")


def check_model_config(config, method: peft.Method | None = None) -> None:
    """Reads the model's config.json and the headers of its weight files (no tensor) so a bad
    model path or file fails before data are loaded, and checks that `method` fits a `random:` preset. (A checkpoint's
    config.json may not describe its weights: the loader compares them first, so a wrong
    d_model is reported as a shape mismatch, not as a method that does not fit.) An uncached
    Hub id is left to the loader, which may fall back (`experiments.finetune.load_model`).

    Raises:
      ConfigError naming the path, the file and the field.
    """
    model = config["model"]
    try:
        t5 = hf_io.load_config(model, check_weights=True)
    except hf_io.ModelNotCachedError:
        return
    except (FileNotFoundError, PermissionError, ValueError) as e:  # missing, gated, corrupt
        raise ConfigError(f"--config.model={model!r}: {e}") from None
    if method is not None and model.startswith("random:"):
        try:
            method.validate(t5)
        except ValueError as e:
            raise ConfigError(f"--config.peft with --config.model={model!r}: {e}") from None


def unset_below_one(value: int) -> int | None:
    """The `-1` sentinel of counts and lengths (`train_samples`, `max_eval_samples`,
    `max_target_length`, `max_steps`, `epochs`): None, else the value."""
    return value if value > 0 else None


@dataclasses.dataclass(frozen=True)
class FineTuneSpec:
    """A fine-tuning (or multi-task) config, checked, with its sentinels resolved.

    Attributes:
      method: the preset with the `--config.peft.*` overrides.
      learning_rate: the config's, or (None) the method's.
      add_task_prefix: the config's, or (None) the method's rule.
      clip_norm: the global gradient clip; None when 0 or under DP (which clips each
        example's gradient instead).
      epochs / max_steps: None = the paper's epochs (20 on small tasks, 3 on large) / no cap.
      eval_every: None = once per epoch; 0 = never.
      save_every: None = at every evaluation (once per epoch when never evaluating).
      devices: the number of local devices to use; None = all.
      dp: differentially private training (`--config.dp.*`).
    """

    method: peft.Method
    learning_rate: float
    add_task_prefix: bool
    clip_norm: float | None
    epochs: int | None
    max_steps: int | None
    eval_every: int | None
    save_every: int | None
    devices: int | None
    dp: bool

    def schedule(self, task_is_small: bool, steps_per_epoch: int) -> tuple[int, int]:
        """(total steps, epochs): `epochs` epochs (the paper's when unset), capped at
        `max_steps`; only `max_steps` when epochs are unset."""
        epochs = self.epochs or (20 if task_is_small else 3)
        total = epochs * steps_per_epoch
        if self.max_steps:
            total = min(total, self.max_steps) if self.epochs else self.max_steps
        return total, epochs

    def eval_period(self, steps_per_epoch: int) -> int:
        """Steps between evaluations (0: never)."""
        return steps_per_epoch if self.eval_every is None else self.eval_every

    def save_period(self, steps_per_epoch: int) -> int:
        """Steps between step checkpoints."""
        return self.save_every or self.eval_period(steps_per_epoch) or steps_per_epoch


def finetune_spec(config) -> FineTuneSpec:
    """The resolved values of a fine-tuning config already checked by `validate_config`."""
    method = peft.get_method(config.method, **{k: v for k, v in config.peft.items()
                                               if v is not None})
    dp = dp_enabled(config)
    return FineTuneSpec(
        method=method,
        learning_rate=(method.learning_rate if config.learning_rate is None
                       else config.learning_rate),
        add_task_prefix=(method.task_prefix if config.add_task_prefix is None
                         else config.add_task_prefix),
        clip_norm=config.clip_norm if config.clip_norm > 0 and not dp else None,
        epochs=unset_below_one(config.epochs), max_steps=unset_below_one(config.max_steps),
        eval_every=None if config.eval_every < 0 else config.eval_every,
        save_every=unset_below_one(config.save_every),
        devices=unset_below_one(config.num_devices), dp=dp)


# -------------------------------------------------------------------------- pretraining

PRETRAIN_OPTIMIZERS = ("adamw", "adafactor")


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """A pretraining config, checked, with its sentinels resolved.

    Attributes:
      total_steps: `num_train_steps` (> 0).
      stop_at_most: `stop_after` (None: run to the end).
      export_dir: None = `<workdir>/hf`.
      vocab_size: None = the tokenizer's size (`vocab_size=0`).
      clip_norm: None = no clipping (`clip_norm=0`).
      tasks: None = every task with local training data (`tasks=""`).
    """

    total_steps: int
    stop_at_most: int | None
    export_dir: str | None
    vocab_size: int | None
    clip_norm: float | None
    tasks: tuple[str, ...] | None


def pretrain_spec(config) -> PretrainSpec:
    """Checks a pretraining config (`experiments/configs/pretrain.py`) and resolves it.

    Raises:
      ConfigError naming the field and the fix.
    """
    check_fields(config, pretrain_defaults(), free=("model",))
    total = int(config.num_train_steps) if isinstance(config.num_train_steps, int) else 0
    if total <= 0:
        raise ConfigError(f"--config.num_train_steps must be positive, got "
                          f"{config.num_train_steps!r}")
    positive = (lambda v: v >= 1, "a positive integer")
    for field in ("batch_size", "eval_batch_size", "inputs_length", "keep_checkpoints",
                  "tokenizer_vocab_size"):
        _check_int(config, field, *positive)
    for field in ("log_every", "eval_every", "save_every", "warmup_steps"):
        _check_int(config, field, lambda v: v >= 0, "0 (never) or a number of steps")
    _check_int(config, "stop_after", lambda v: v == -1 or v >= 1,
              "-1 (run to the end) or a number of steps")
    _check_int(config, "vocab_size", lambda v: v >= 0, "0 (the tokenizer's size) or more")
    for field in ("seed", "data_seed", "heldout_corruption_seed"):
        _check_int(config, field, lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1")
    _check_float(config, "noise_density", lambda v: 0 < v < 1,
                "in (0, 1), the share of tokens corrupted (T5: 0.15)")
    _check_float(config, "mean_noise_span_length", lambda v: v >= 1,
                "1 or more tokens per span (T5: 3.0)")
    _check_float(config, "heldout_fraction", lambda v: 0 < v < 1, "in (0, 1)")
    _check_float(config, "denoise_fraction", lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_float(config, "learning_rate", lambda v: 0 < v <= float(np.finfo(np.float32).max),
                "a positive finite float32 (e.g. 2e-3)")
    _check_float(config, "weight_decay", lambda v: v >= 0, "0 or more")
    _check_float(config, "clip_norm", lambda v: v >= 0, "0 (no clipping) or more")
    _check_float(config, "export_dropout_rate", lambda v: 0 <= v < 1, "in [0, 1)")
    if config.optimizer not in PRETRAIN_OPTIMIZERS:
        raise ConfigError(f"{flag('optimizer', config.optimizer)}: use one of "
                          f"{', '.join(PRETRAIN_OPTIMIZERS)}")
    # 32,100 pieces of the shared T5 vocabulary, or the trained tokenizer's pieces + sentinels.
    vocab = config.vocab_size or (config.tokenizer_vocab_size + 100 if config.tokenizer == "train"
                                  else 32100)
    check_model_sizes(config.model, vocab)
    tasks = tuple(t.strip() for t in str(config.tasks).split(",") if t.strip())
    return PretrainSpec(total_steps=total,
                        stop_at_most=None if config.stop_after <= 0 else config.stop_after,
                        export_dir=config.export_dir or None,
                        vocab_size=config.vocab_size or None,
                        clip_norm=config.clip_norm or None, tasks=tasks or None)
