"""Fine-tune a T5 with a PEFT method on a GLUE/SuperGLUE task: config -> result.

The reading path (flax examples/wmt style):
  load data -> tokenise -> build T5 + method -> split trainable/frozen -> optax ->
  resumable loop (jit or pmap) with evaluation by greedy decoding -> test at the best
  validation checkpoint -> adapter export, metrics.jsonl, TensorBoard, summary, plot.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.models import greedy_generate
from compacter_jax.tokenizer import load_tokenizer
from compacter_jax.train import (Checkpointer, TrainState, make_optimizer,
                                 make_strategy, make_train_step, seq2seq_apply_fn, train_loop)
from experiments import reporting

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """Everything built from the config that evaluation and reporting need."""

    config: ml_collections.ConfigDict
    task: data_lib.Task
    tokenizer: Any
    model: Any
    model_name: str
    peft_config: peft.PeftConfig
    encoded: dict[str, data_lib.EncodedData]


# ----------------------------------------------------------------------------- data


def resolve_source(config) -> data_lib.Source:
    """`files`, `tfds`, or `auto`: TFDS when the task is prepared there, else local files."""
    data_dir = config.data_dir or None
    if config.source != "auto":
        return data_lib.make_source(config.source, data_dir=data_dir, download=config.download)
    tfds_source = data_lib.make_source("tfds", data_dir=data_dir, download=False)
    try:
        tfds_source.load(config.task, "validation" if config.task != "mnli"
                         else "validation_matched")
        log.info("data: tensorflow-datasets (%s)", tfds_source)
        return tfds_source
    except Exception as e:  # not prepared / TFDS unusable here: fall back to local files
        log.info("data: TFDS not available for %s (%s); using local files", config.task,
                 str(e).splitlines()[0][:200])
        return data_lib.make_source("files", data_dir=None)


def load_data(config, task, tokenizer) -> dict[str, data_lib.EncodedData]:
    source = resolve_source(config)
    train_samples = config.train_samples if config.train_samples > 0 else None
    splits = data_lib.paper_splits(task, source, data_seed=config.seed,
                                   train_samples=train_samples)
    encoded = {}
    for name, examples in splits.items():
        if name != "train" and config.max_eval_samples > 0:
            examples = examples[:config.max_eval_samples]
        if not examples:
            raise data_lib.DataError(f"{task.name}: the {name} split is empty")
        encoded[name] = data_lib.encode(task, examples, tokenizer,
                                        max_source_length=config.max_source_length,
                                        max_target_length=config.max_target_length,
                                        train=name == "train")
        log.info("%s %s: %d rows (%d sources truncated)", task.name, name, len(encoded[name]),
                 encoded[name].num_truncated_source)
    return encoded


# ---------------------------------------------------------------------------- model


def peft_overrides(config) -> dict[str, Any]:
    return {k: v for k, v in config.peft.items() if v is not None}


def load_model(config, peft_config: peft.PeftConfig, rng):
    """(model, params, name): the configured model, or the fallback with a loud warning.
    Layers are scanned when asked and the method places the same modules in every block."""
    scan = config.scan_layers and not peft_config.layer_dependent
    if config.scan_layers and not scan:
        log.info("%s places adapters in some blocks only: layers are not scanned",
                 peft_config.method)
    kwargs = dict(rng=rng, dtype=config.dtype, scan_layers=scan, remat=config.remat)
    try:
        model, params = peft.from_pretrained_with_method(config.model, peft_config, **kwargs)
        name = config.model
    except FileNotFoundError as e:
        if not config.fallback_model:
            raise
        name = config.fallback_model
        banner = "!" * 78
        warnings.warn(f"\n{banner}\n{e}\nFALLING BACK TO {name}: randomly initialised weights. "
                      f"Scores mean nothing without pretrained weights.\n{banner}", stacklevel=2)
        model, params = peft.from_pretrained_with_method(name, peft_config, **kwargs)
    return model, params, name


# ------------------------------------------------------------------------- evaluate


def predict(run: Run, params, split: str, batch_size: int) -> tuple[list[str], list[Any]]:
    """Greedy-decodes every row of `split` with full `params`: (texts, references)."""
    encoded = run.encoded[split]
    texts: list[str] = [""] * len(encoded)
    for batch in data_lib.eval_batches(encoded, batch_size):
        ids = greedy_generate(run.model, params, batch["input_ids"], batch["attention_mask"],
                              max_new_tokens=run.config.max_target_length)
        decoded = data_lib.decode_predictions(run.tokenizer, np.asarray(ids))
        for row, text in zip(batch["example_index"], decoded):
            if row >= 0:
                texts[row] = text
    return texts, list(encoded.references)


def evaluate(run: Run, params, split: str) -> dict[str, float]:
    texts, refs = predict(run, params, split, run.config.eval_batch_size)
    preds = [run.task.parse_prediction(t) for t in texts]
    groups = run.encoded[split].groups if any(g is not None for g in
                                              run.encoded[split].groups) else None
    return data_lib.compute_metrics(run.task, preds, refs, groups=groups)


def full_params(strategy, device_trainable, device_frozen, frozen_host):
    """The full param tree for decoding: under jit the device (mesh) trees as they are;
    under pmap (leading device axis) one replica of the trainable tree + the host backbone."""
    if strategy.name == "pmap":
        return peft.merge(strategy.unreplicate(device_trainable), frozen_host)
    return peft.merge(device_trainable, device_frozen)


# ------------------------------------------------------------------------------ main


def schedule_length(config, task_is_small: bool, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, epochs) from epochs / max_steps."""
    epochs = config.epochs if config.epochs > 0 else (20 if task_is_small else 3)
    total = epochs * steps_per_epoch
    if config.max_steps > 0:
        total = min(total, config.max_steps) if config.epochs > 0 else config.max_steps
    return total, epochs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) one fine-tuning job in `workdir`; returns the summary dict."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task = data_lib.get_task(config.task)
    peft_config = peft.get_method(config.method, **peft_overrides(config))
    learning_rate = config.learning_rate or peft.RECOMMENDED_LR[peft_config.method]
    tokenizer = load_tokenizer(config.tokenizer or None)
    encoded = load_data(config, task, tokenizer)

    # A random backbone is a function of the seed alone, so an exported adapter can be put
    # back onto the same random weights (load_adapter reads `init_seed`).
    init_rng = jax.random.PRNGKey(config.seed)
    dropout_rng = jax.random.fold_in(init_rng, 1)
    model, params, model_name = load_model(config, peft_config, init_rng)
    labels = peft.label_params(params, peft_config)
    trainable, frozen = peft.split(params, labels)
    del params
    n_trainable = peft.count(trainable)
    n_total = n_trainable + peft.count(frozen)
    log.info("model %s, method %s: %s trainable of %s params (%.3f%%)", model_name,
             peft_config.method, f"{n_trainable:,}", f"{n_total:,}",
             100 * n_trainable / n_total)

    devices = jax.devices()[:config.num_devices] if config.num_devices > 0 else None
    strategy = make_strategy(config.strategy, devices, shard_frozen=config.shard_frozen)
    per_epoch = data_lib.steps_per_epoch(len(encoded["train"]), config.batch_size)
    if per_epoch == 0:
        raise ValueError(f"--config.batch_size={config.batch_size} exceeds the {task.name} "
                         f"training set ({len(encoded['train'])} rows)")
    total_steps, epochs = schedule_length(config, task.is_small, per_epoch)
    eval_every = config.eval_every if config.eval_every > 0 else per_epoch
    save_every = config.save_every if config.save_every > 0 else eval_every

    tx, schedule = make_optimizer(learning_rate, min(config.warmup_steps, total_steps),
                                  total_steps, weight_decay=config.weight_decay,
                                  clip_norm=config.clip_norm if config.clip_norm > 0 else None)
    state = TrainState.create(trainable, tx, dropout_rng)
    train_step = make_train_step(seq2seq_apply_fn(model), tx, schedule=schedule,
                                 per_example_dropout=config.per_example_dropout)

    run = Run(config, task, tokenizer, model, model_name, peft_config, encoded)
    writer = reporting.MetricsWriter(workdir)
    progress = reporting.Progress(total_steps, config.batch_size)

    def eval_fn(dev_state, dev_frozen, step):
        start = time.perf_counter()
        metrics = evaluate(run, full_params(strategy, dev_state.params, dev_frozen, frozen), "validation")
        writer.write(step, {f"validation/{k}": v for k, v in metrics.items()})
        progress.note(f"step {step}: validation " + reporting.format_metrics(metrics)
                      + f" ({time.perf_counter() - start:.1f}s)")
        return metrics

    def batches(position):
        # Every host draws the same global batch (same seed) and keeps its own rows.
        for batch, nxt in data_lib.train_batches(encoded["train"], config.batch_size,
                                                 seed=config.seed, state=position):
            yield nxt, data_lib.shard_for_host(batch, jax.process_index(), jax.process_count())

    def log_fn(step, window):
        progress.update(step, window)
        writer.write(step, {"train/" + k: float(np.mean([m[k] for m in window]))
                            for k in window[-1] if k != "step"})

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    with ckpt:
        result = train_loop(state=state, frozen=frozen, train_step=train_step, strategy=strategy,
                            batches=batches, num_steps=total_steps, checkpointer=ckpt,
                            save_every=save_every, eval_fn=eval_fn, eval_every=eval_every,
                            log_every=config.log_every, log_fn=log_fn,
                            config=config.to_dict())
        progress.close()
        best = ckpt.restore_best(trainable)
    best_params = best[0] if best else strategy.unreplicate(result.state.params)
    best_step = int(best[1].get("step", total_steps)) if best else total_steps
    summary: dict[str, Any] = {
        "task": task.name, "method": peft_config.method, "model": model_name,
        "trainable_params": n_trainable, "total_params": n_total, "steps": total_steps,
        "best_step": best_step, "best_validation_score": ckpt.best_score,
    }
    if config.eval_test and "test" in encoded:
        test = evaluate(run, peft.merge(best_params, frozen), "test")
        writer.write(best_step, {f"test/{k}": v for k, v in test.items()})
        summary["test"] = test
    history = writer.read()
    summary["validation"] = next((h for h in reversed(history) if h["step"] == best_step
                                  and any(k.startswith("validation/") for k in h)), {})
    peft.save_adapter(workdir / "adapter", best_params, peft_config, model=model_name,
                      task=task.name, step=best_step, init_seed=config.seed,
                      max_source_length=config.max_source_length,
                      max_target_length=config.max_target_length)
    reporting.write_summary(workdir, summary)
    reporting.plot_curves(history, workdir / "learning_curves.png", title=
                          f"{task.name} · {peft_config.method} · {model_name}")
    writer.close()
    return summary
