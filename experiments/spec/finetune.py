"""A fine-tuning (or multi-task) run's values, checked before data are loaded, a model is read or
anything is compiled (`validate_config`), and resolved into a typed `FineTuneSpec`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.data.sources import SOURCE_KINDS
from compacter_jax.models import hf_io
from compacter_jax.models.config import is_random
from compacter_jax.paths import checkpoints_dir
from compacter_jax.peft.methods.full import FullFineTuning
from compacter_jax.train.optim import OPTIMIZERS
from experiments.evaluation import EVAL_MODES
from experiments.spec.fields import (FLOAT32_MAX, ConfigError, check_choice, check_float,
                                     check_int, flag, minus_one_or_positive, positive)

STRATEGIES = ("jit", "pmap")
# The embedded backbone (256 wide, 30M tokens of pretraining): at the paper's rates the methods
# that add or pick a few weights stay at the label prior for thousands of steps; at 10x
# Compacter++ learns SST-2 (docs/small_scale.md). The default `learning_rate_scale` there,
# for methods whose paper rate is below EMBEDDED_RATE_CEILING (not prompt tuning's 3e-2 / 3e-1
# or ATTEMPT's, already that large) other than full fine-tuning (which learns at its own);
# 1 on any other model.
EMBEDDED_MODEL = "t5-mini-glue"
EMBEDDED_LEARNING_RATE_SCALE = 10.0
EMBEDDED_RATE_CEILING = 3e-2
DTYPES = ("float32", "bfloat16")
_ADDRESS = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


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
        raise ConfigError(f"{flag('model', config['model'])}: name a local HF checkpoint "
                          "directory, a Hub id or random:<preset>")
    return method


def _check_sources(config) -> None:
    check_choice(config, "source", SOURCE_KINDS)
    check_choice(config, "dtype", DTYPES)
    check_choice(config, "strategy", STRATEGIES)
    check_choice(config, "eval_mode", EVAL_MODES)
    if config.get("shard_frozen") and config.get("strategy") == "pmap":
        raise ConfigError("--config.shard_frozen=True needs --config.strategy=jit (pmap "
                          "replicates every leaf)")
    if config.get("download") and config.get("source") == "files":
        raise ConfigError("--config.download=True only applies to --config.source=tfds or "
                          "auto")
    data_dir = config.get("data_dir")
    if data_dir and not config.get("download") and not Path(data_dir).expanduser().is_dir():
        raise ConfigError(f"{flag('data_dir', data_dir)}: no such directory; point it at the "
                          "folder of GLUE/SuperGLUE files (or of prepared TFDS data), or leave "
                          "it empty for $COMPACTER_DATA_DIR")


def _check_schedule(config) -> None:
    """Sizes, schedule and optimizer."""
    for field in ("batch_size", "eval_batch_size", "max_source_length", "log_every",
                  "keep_checkpoints"):
        check_int(config, field, positive, "a positive integer")
    for field in ("max_target_length", "epochs", "max_steps", "train_samples",
                  "max_eval_samples"):
        check_int(config, field, minus_one_or_positive, "-1 (the default) or a positive "
                   "integer")
    check_int(config, "warmup_steps", lambda v: v >= 0, "0 or more")
    check_int(config, "packing_row_buckets", lambda v: v >= 1, "a positive integer (the "
              "row counts a packed batch may have; 4 is the default)")
    check_int(config, "packing_target_buckets", lambda v: v >= 0, "0 (one target length) or "
              "a positive integer (4 is the default)")
    check_int(config, "source_bucket", lambda v: v >= 0,
               "0 (pad sources to max_source_length) or a column multiple, e.g. 32")
    check_int(config, "eval_every", lambda v: v >= -1,
               "-1 (once per epoch), 0 (never) or a number of steps")
    check_int(config, "save_every", lambda v: v >= -1,
               "-1 (at every evaluation) or a number of steps")
    for field in ("seed", "data_seed"):  # PRNGKey and numpy seeds are unsigned 32-bit
        check_int(config, field, lambda v: 0 <= v < 2**32, "an integer in 0..2**32-1")
    check_float(config, "learning_rate", lambda v: 0 < v <= FLOAT32_MAX,
                 "a positive finite float32 (e.g. 3e-3); leave it unset for the method's "
                 "rate", optional=True)
    check_float(config, "learning_rate_scale", lambda v: 0 < v <= 1e4,
                 "a positive number (1.0: the method's rate as it is); leave it unset for "
                 "the backbone's", optional=True)
    check_float(config, "weight_decay", lambda v: v >= 0, "0 or more")
    check_float(config, "clip_norm", lambda v: v >= 0, "0 (no clipping) or more")
    check_choice(config, "optimizer", OPTIMIZERS)
    resize = config.get("resize_vocab_to_tokenizer", False)
    if not isinstance(resize, bool):
        raise ConfigError(f"{flag('resize_vocab_to_tokenizer', resize)}: expected True or "
                          "False")


def _check_processes(config) -> None:
    """Parallelism and processes."""
    check_int(config, "num_devices", lambda v: v == -1 or v >= 1,
               "-1 (all devices) or a positive integer")
    check_int(config, "num_processes", minus_one_or_positive,
               "-1 (unset) or the number of processes")
    check_int(config, "process_id", lambda v: v >= -1, "-1 (unset) or this process's index")
    if config.get("num_processes", -1) > 0 and config.get("process_id", -1) >= \
            config["num_processes"]:
        raise ConfigError(f"{flag('process_id', config['process_id'])}: must be below "
                          f"--config.num_processes={config['num_processes']}")
    address = config.get("coordinator_address", "")
    if address and not _ADDRESS.match(address):
        raise ConfigError(f"{flag('coordinator_address', address)}: expected host:port of "
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
        raise ConfigError(f"{flag('dp.noise_multiplier', dp['dp.noise_multiplier'])} and "
                          f"{flag('dp.epsilon', dp['dp.epsilon'])}: set one (the noise, or the "
                          "target epsilon the noise is calibrated for), not both")
    check_float(dp, "dp.noise_multiplier", lambda v: v > 0, "> 0 (noise 0 gives no privacy: "
                 "epsilon is infinite); e.g. 1.0", optional=True)
    check_float(dp, "dp.epsilon", lambda v: v > 0, "a positive target epsilon, e.g. 3 or 8",
                 optional=True)
    check_float(dp, "dp.clip_norm", lambda v: v > 0, "a positive per-example gradient norm "
                 "bound, e.g. 1.0")
    check_float(dp, "dp.delta", lambda v: 0 < v < 1, "in (0, 1), below 1 / (training "
                 "examples); leave it unset for 1 / N**1.1", optional=True)
    check_int(dp, "dp.microbatch_size", minus_one_or_positive, "-1 (all examples of the batch "
               "at once) or a positive number of examples")
    from compacter_jax.train.privacy import ACCOUNTANTS  # noqa: PLC0415 (DP runs only)
    if dp.get("dp.accountant") not in ACCOUNTANTS:
        raise ConfigError(f"{flag('dp.accountant', dp.get('dp.accountant'))}: use one of "
                          f"{', '.join(ACCOUNTANTS)}")
    if config.get("packing"):
        raise ConfigError("--config.packing=True with --config.dp: DP clips each example's "
                          "gradient, and a packed row mixes several examples; set "
                          "--config.packing=False (or leave it unset: DP runs use padded "
                          "batches)")


def _check_devices(config, available: int, processes: int, padded: bool) -> None:
    requested = config.get("num_devices", -1)
    if requested > available:
        raise ConfigError(f"{flag('num_devices', requested)}: only {available} device(s) "
                          "are available; use -1 for all of them or a smaller number")
    if processes > 1 and requested not in (-1, available):
        raise ConfigError(f"{flag('num_devices', requested)}: a run of {processes} processes "
                          f"uses all their {available} devices; leave it at -1")
    used = available if requested == -1 else requested
    # Packed batches get a multiple of the devices in rows; padded ones have batch_size rows.
    if padded and config["batch_size"] % used:
        raise ConfigError(f"{flag('batch_size', config['batch_size'])} is not divisible by "
                          f"the {used} devices the batch is split over; use a multiple of "
                          f"{used} or set --config.num_devices")


def check_model_config(config, method: peft.Method | None = None) -> None:
    """Reads the model's config.json and the headers of its weight files (no tensor) so a bad
    model path or file fails before data are loaded, and checks that `method` fits a `random:` preset. (A checkpoint's
    config.json may not describe its weights: the loader compares them first, so a wrong
    d_model is reported as a shape mismatch, not as a method that does not fit.) An uncached
    Hub id is left to the loader, which may fall back (`experiments.backbone.load_model`).

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
    if method is not None and is_random(model):
        try:
            method.validate(t5)
        except ValueError as e:
            raise ConfigError(f"--config.peft with --config.model={model!r}: {e}") from None


def unset_below_one(value: int) -> int | None:
    """The `-1` sentinel of counts and lengths (`train_samples`, `max_eval_samples`,
    `max_target_length`, `max_steps`, `epochs`): None, else the value."""
    return value if value > 0 else None


def backbone_scale_applies(method: peft.Method, base_learning_rate: float) -> bool:
    """Whether a small backbone's learning-rate scale is meant for `method` at this rate: a
    frozen-backbone method (not full fine-tuning, which learns at its own rate) whose rate is
    below EMBEDDED_RATE_CEILING (prompt tuning's 3e-2 / 3e-1 and ATTEMPT's are already that
    large)."""
    return (not isinstance(method, FullFineTuning)
            and base_learning_rate < EMBEDDED_RATE_CEILING)


@dataclasses.dataclass(frozen=True)
class FineTuneSpec:
    """A fine-tuning (or multi-task) config, checked, with its sentinels resolved.

    Attributes:
      method: the preset with the `--config.peft.*` overrides.
      base_learning_rate: the config's learning rate, or (None) the method's.
      learning_rate_scale: multiplies the method's rate (not an explicit one); None = the
        backbone's (`learning_rate_for`).
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
    base_learning_rate: float
    learning_rate_scale: float | None
    add_task_prefix: bool
    clip_norm: float | None
    epochs: int | None
    max_steps: int | None
    eval_every: int | None
    save_every: int | None
    devices: int | None
    dp: bool

    def learning_rate_for(self, model_folder: Path | None) -> float:
        """The run's peak rate on the backbone in `model_folder` (None: a `random:` preset):
        an explicit `learning_rate` as it is; else the method's times `learning_rate_scale`,
        whose default is EMBEDDED_LEARNING_RATE_SCALE on the embedded t5-mini-glue (for the
        methods it helps, see above) and 1 on any other backbone."""
        if self.learning_rate_scale is not None:
            return self.base_learning_rate * self.learning_rate_scale
        embedded = (model_folder is not None and model_folder.resolve()
                    == (checkpoints_dir() / EMBEDDED_MODEL).resolve())
        scaled = embedded and backbone_scale_applies(self.method, self.base_learning_rate)
        return self.base_learning_rate * (EMBEDDED_LEARNING_RATE_SCALE if scaled else 1.0)

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
        base_learning_rate=(method.learning_rate if config.learning_rate is None
                            else config.learning_rate),
        learning_rate_scale=(config.get("learning_rate_scale")
                             if config.learning_rate is None else 1.0),
        add_task_prefix=(method.task_prefix if config.add_task_prefix is None
                         else config.add_task_prefix),
        clip_norm=config.clip_norm if config.clip_norm > 0 and not dp else None,
        epochs=unset_below_one(config.epochs), max_steps=unset_below_one(config.max_steps),
        eval_every=None if config.eval_every < 0 else config.eval_every,
        save_every=unset_below_one(config.save_every),
        devices=unset_below_one(config.num_devices), dp=dp)
