"""Fine-tune a T5 with a PEFT method on a GLUE/SuperGLUE task: `train_and_evaluate(config,
workdir)` reads top-down, as flax examples/wmt/train.py:

  data -> T5 + method -> trainable/frozen -> optimizer and train step -> resume -> the loop
  (step, logging, evaluation, checkpoints) -> test at the best validation checkpoint ->
  adapter export, metrics.jsonl, TensorBoard, summary, plot.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.peft import sparsity as sparsity_lib
from compacter_jax.train import step as step_lib
from compacter_jax.train import (Checkpointer, MetricsBuffer, TrainState, due, make_optimizer,
                                 make_strategy, make_train_step, mean_metrics, seq2seq_apply_fn)
from experiments import backbone
from experiments import dp as dp_run
from experiments import multihost, reporting
from experiments import run as run_lib
from experiments import spec as spec_lib
from experiments import workdir as workdir_lib
from experiments.evaluation import Evaluator

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def resolve_source(config) -> data_lib.Source:
    """`files`, `tfds`, or `auto` (`data_lib.AutoSource`): the local files where they hold the
    task, else tensorflow-datasets, downloading and preparing it once when the network answers.
    `download` unset (None) lets `auto` and `tfds` download what is missing."""
    data_dir = config.data_dir or None
    download = config.download
    if config.source != "files" and download is None:
        download = True
    return data_lib.make_source(config.source, data_dir=data_dir, download=download)


def target_length(config, task, tokenizer) -> int:
    """`max_target_length`, or (-1) the task's: the longest label, 128 for free-text targets."""
    return spec_lib.unset_below_one(config.max_target_length) or task.max_target_length(
        tokenizer)


def load_data(config, task, tokenizer, add_prefix: bool) -> dict[str, data_lib.EncodedData]:
    """The paper's train / validation / test splits of `task`, tokenised (as the original:
    the task name first for methods that are not adapters, evaluation sets cut to
    `max_eval_samples` the original's way)."""
    source = resolve_source(config)
    limit = spec_lib.unset_below_one(config.max_eval_samples)
    splits = data_lib.load_paper_splits(
        task, source, data_seed=config.data_seed,
        train_samples=spec_lib.unset_below_one(config.train_samples),
        max_validation_samples=limit, max_test_samples=limit)
    encoded = {}
    for name, split in splits.items():
        if not split.examples:
            raise data_lib.DataError(f"{task.name}: the {name} split is empty")
        encoded[name] = data_lib.encode(task, split.examples, tokenizer,
                                        max_source_length=config.max_source_length,
                                        max_target_length=target_length(config, task, tokenizer),
                                        train=name == "train", add_prefix=add_prefix,
                                        rows=split.rows)
        log.info("%s %s: %d rows (%d sources truncated)", task.name, name, len(encoded[name]),
                 encoded[name].num_truncated_source)
    return encoded


def packing_plan(config, method: peft.Method, encoded: data_lib.EncodedData, num_epochs: int,
                 num_devices: int) -> data_lib.PackingPlan | None:
    """The packed shapes of the run, or None for padded batches. `packing` None (default): on
    when the method supports it."""
    if config.packing is False or (config.packing is None and not method.packable):
        return None
    if spec_lib.dp_enabled(config):  # per-example clipping needs one example per row
        return None
    if config.get("source_bucket", 0):
        raise ValueError(f"--config.source_bucket={config.source_bucket} cuts padded batches, "
                         f"but {method.name} trains on packed rows here; set "
                         "--config.packing=False to use it, or leave it 0")
    if not method.packable:
        raise ValueError(f"--config.packing=True: {method.name} does not support packed inputs "
                         "(a soft prompt per segment would change every row); set it False")
    if config.per_example_dropout:
        raise ValueError("--config.per_example_dropout=True draws one key per row, which packing "
                         "shares between examples; set --config.packing=False to use it")
    return data_lib.plan_packing(encoded, config.batch_size, seed=config.seed,
                                 num_epochs=num_epochs, multiple_of=num_devices,
                                 max_buckets=config.packing_row_buckets,
                                 tight_targets=config.packing_target_buckets > 0,
                                 max_target_buckets=max(1, config.packing_target_buckets))


def train_batches(config, encoded: data_lib.EncodedData, position: data_lib.DataState,
                  plan: data_lib.PackingPlan | None, *, with_fill: bool = False):
    """(position after, this host's slice of the global batch) from `position` on: the
    recipe's batches, packed by `plan` or padded to the batch size. Every host builds the same
    global batch (same seed) and keeps its own rows. `with_fill=True` adds a third item, the
    token fill of the *global* batch (`data.fill`), the same on every host."""
    for batch, after in data_lib.train_batches(encoded, config.batch_size, seed=config.seed,
                                               state=position):
        batch = plan.pack(batch) if plan else data_lib.pad_batch(
            batch, config.batch_size, source_multiple=config.get("source_bucket", 0))
        mine = data_lib.shard_for_host(batch, jax.process_index(), jax.process_count())
        yield (after, mine, data_lib.fill(batch)) if with_fill else (after, mine)


# ---------------------------------------------------------------------------- model


PRUNE_BATCHES = 4  # training batches whose mean gradient scores SNIP / GraSP


def prune_at_init(config, method: peft.Method, model, trainable, frozen,
                  train: data_lib.EncodedData, rng):
    """(trainable, masks): SparseAdapter's pruning at initialisation (`peft/sparsity.py`)
    when the method has `sparsity` > 0, scored on the run's first training batches (padded);
    else (trainable, None). A function of the seed and data, so a resumed run recomputes
    the same masks (its checkpointed optimizer state holds them too)."""
    if not getattr(method, "sparsity", 0.0):
        return trainable, None
    apply_fn = seq2seq_apply_fn(model)

    def loss(params, batch):
        logits = apply_fn(method.combine(params, frozen), batch, True, None)
        return step_lib.loss_fn(logits, batch["labels"], batch["decoder_attention_mask"])[0]

    stream = data_lib.train_batches(train, config.batch_size, seed=config.seed)
    batches = [data_lib.pad_batch(b, config.batch_size)
               for b, _ in itertools.islice(stream, PRUNE_BATCHES)]
    pruned, masks = sparsity_lib.prune_at_init(
        trainable, method.sparsity, method.prune, key=jax.random.fold_in(rng, 2),
        loss_fn=loss, batches=batches)
    log.info("%s: %.0f%% of the adapter weights pruned at init by %s", method.name,
             100 * method.sparsity, method.prune)
    return pruned, masks


def peft_overrides(config) -> dict[str, Any]:
    """The `--config.peft.<field>` values that were set (None keeps the preset's)."""
    return {k: v for k, v in config.peft.items() if v is not None}


def schedule_length(config, task_is_small: bool, steps_per_epoch: int) -> tuple[int, int]:
    """(total steps, epochs) from epochs / max_steps (`spec.FineTuneSpec.schedule`)."""
    return spec_lib.finetune_spec(config).schedule(task_is_small, steps_per_epoch)


# ------------------------------------------------------------------------- the run


@dataclasses.dataclass
class FineTuning:
    """Everything the loop of one fine-tuning run uses, built by `build` (data, model, the
    compiled step, the evaluator) before the first step."""

    task: data_lib.Task
    method: peft.Method
    tokenizer: Any
    encoded: dict[str, data_lib.EncodedData]
    model: Any
    model_name: str
    trainable: Any
    frozen: Any
    masks: Any  # SparseAdapter's pruning masks, or None
    counts: tuple[int, int]  # (trainable, total) parameters
    vocab_size: int | None
    backbone_sha256: str
    init_rng: Any
    strategy: Any
    total_steps: int
    per_epoch: int
    eval_every: int  # 0: never
    save_every: int
    plan: data_lib.PackingPlan | None
    dp_plan: Any
    tx: Any
    learning_rate: float
    add_prefix: bool
    train_step: Any
    evaluator: Evaluator


def build_model(config, spec: spec_lib.FineTuneSpec, task: data_lib.Task) -> dict[str, Any]:
    """The data, the backbone with the method, and its trainable/frozen parts (pruned at
    init for SparseAdapter). The backbone, if random, is a function of the seed alone, so an
    exported adapter can be put back onto the same random weights (`init_seed`)."""
    method, add_prefix = spec.method, spec.add_task_prefix
    resolved = backbone.resolve_model(config)  # downloads a Hub model; the fallback's banner
    tokenizer = backbone.load_tokenizer_for(config, *resolved)
    encoded = load_data(config, task, tokenizer, add_prefix)
    init_rng = jax.random.PRNGKey(config.seed)
    vocab_size = backbone.tokenizer_vocab_size(config, tokenizer)
    model, params, model_name = backbone.load_model(config, method, init_rng, resolved=resolved,
                                           vocab_size=vocab_size)
    backbone.check_tokenizer_fits(tokenizer, model)
    learning_rate = spec.learning_rate_for(resolved[1])
    # What the export records so that load_adapter refuses any other backbone.
    backbone_sha256 = peft.backbone_fingerprint(params, method)
    trainable, frozen = method.partition(params)
    del params
    trainable, masks = prune_at_init(config, method, model, trainable, frozen, encoded["train"],
                                     init_rng)
    n_trainable = peft.count(trainable)
    n_total = n_trainable + peft.count(frozen)
    if masks is not None:  # report non-zeros: pruned weights are not trained
        n_trainable = sparsity_lib.trained_count(trainable, masks)
    log.info("model %s, method %s: %s trainable of %s params (%.3f%%), learning rate %g",
             model_name, method.name, f"{n_trainable:,}", f"{n_total:,}",
             100 * n_trainable / n_total, learning_rate)
    return dict(task=task, method=method, tokenizer=tokenizer, encoded=encoded, model=model,
                model_name=model_name, trainable=trainable, frozen=frozen, masks=masks,
                counts=(n_trainable, n_total), vocab_size=vocab_size,
                backbone_sha256=backbone_sha256, init_rng=init_rng, add_prefix=add_prefix,
                learning_rate=learning_rate)


def build(config, spec: spec_lib.FineTuneSpec, workdir: Path) -> FineTuning:
    """`build_model`, then the schedule, optimizer, compiled train step and evaluator."""
    method = spec.method
    parts = build_model(config, spec, data_lib.get_task(config.task))
    task, encoded, model = parts["task"], parts["encoded"], parts["model"]
    devices = jax.devices()[:spec.devices] if spec.devices else None
    strategy = make_strategy(config.strategy, devices, shard_frozen=config.shard_frozen)
    per_epoch = data_lib.steps_per_epoch(len(encoded["train"]), config.batch_size)
    total_steps, _ = spec.schedule(task.is_small, per_epoch)
    plan = packing_plan(config, method, encoded["train"], math.ceil(total_steps / per_epoch),
                        strategy.num_devices)
    dp_plan = (dp_run.make_plan(config, len(encoded["train"]), total_steps,
                                strategy.num_devices) if spec.dp else None)
    # Under DP each example's gradient is clipped (dp.clip_norm); no second, global clip.
    tx, schedule = make_optimizer(parts["learning_rate"], config.warmup_steps,
                                  total_steps, weight_decay=config.weight_decay,
                                  clip_norm=spec.clip_norm,
                                  optimizer=config.optimizer)
    if parts["masks"] is not None:  # pruned weights never move, whatever the optimizer does
        tx = optax.chain(tx, sparsity_lib.keep_pruned(parts["masks"]))
    train_step = strategy.compile_train_step(
        dp_run.make_train_step(dp_plan, seq2seq_apply_fn(model), tx, merge_fn=method.combine,
                               schedule=schedule) if dp_plan else
        make_train_step(seq2seq_apply_fn(model), tx, merge_fn=method.combine,
                        schedule=schedule, per_example_dropout=config.per_example_dropout))
    # Several processes: each decodes its share of the batches on its own devices, from
    # process-local parameters, and the texts are gathered.
    evaluator = (multihost.HostShardedEvaluator if jax.process_count() > 1 else Evaluator)(
        task, parts["tokenizer"], model, {k: v for k, v in encoded.items() if k != "train"},
        config.eval_batch_size, target_length(config, task, parts["tokenizer"]),
        mode=config.eval_mode, predictions_dir=workdir / "predictions")
    return FineTuning(**parts, strategy=strategy, total_steps=total_steps, per_epoch=per_epoch,
                      eval_every=spec.eval_period(per_epoch),
                      save_every=spec.save_period(per_epoch), plan=plan, dp_plan=dp_plan,
                      tx=tx, train_step=train_step,
                      evaluator=evaluator)


def eval_params(run: FineTuning, dev_params, dev_frozen):
    """The combined parameters the evaluator decodes with: process-local host copies when
    several processes decode their shares, else one device copy."""
    if jax.process_count() > 1:
        return run.method.combine(run.strategy.unreplicate(dev_params), run.frozen)
    return run.method.combine(run.strategy.one_copy(dev_params),
                              run.strategy.one_copy(dev_frozen))


# ------------------------------------------------------------------------------ main


def check_config(config: ml_collections.ConfigDict) -> None:
    """The checks that need no JAX backend (before `jax.distributed` is joined): every field
    known and present (`spec.check_fields`), every value usable (`validation`).

    Raises:
      ConfigError naming the field and the fix.
    """
    spec_lib.check_fields(config, spec_lib.glue_defaults())
    spec_lib.validate_config(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) one fine-tuning job in `workdir`; returns the summary dict.

    Before anything is loaded or compiled: the config is validated (`ConfigError`), the
    model's config.json is read, the workdir is checked writable, locked, and a resume must
    match the config it resumes (`WorkdirError`); all name the field or path and the fix.
    """
    spec_lib.check_fields(config, spec_lib.glue_defaults())
    spec_lib.validate_config(config, available_devices=len(jax.devices()),
                             processes=jax.process_count())
    spec = spec_lib.finetune_spec(config)
    spec_lib.check_model_config(config, spec.method)
    workdir = Path(workdir).expanduser().absolute()
    with run_lib.claim_workdir(config, workdir):
        return _fine_tune(config, spec, workdir)


def _fine_tune(config: ml_collections.ConfigDict, spec: spec_lib.FineTuneSpec,
               workdir: Path) -> dict:
    """The run itself, top-down, in a claimed workdir."""
    run = build(config, spec, workdir)
    strategy, total_steps, dp_plan = run.strategy, run.total_steps, run.dp_plan

    # Resume where the last checkpoint stopped (state and data position), or start.
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    state = TrainState.create(run.trainable, run.tx, jax.random.fold_in(run.init_rng, 1))
    state, meta = run_lib.restore(ckpt, state, config,
                                  refuse=dp_run.refuse_changed_mechanism if dp_plan else None)
    position = data_lib.DataState.from_dict(meta["data_position"]) if meta else (
        data_lib.DataState())
    if ckpt.best_step is not None:
        ckpt.restore_best(run.trainable)  # a corrupt best is found now, not after training
    start_step = int(state.step)
    dev_state, dev_frozen = strategy.replicate(state), strategy.put_frozen(run.frozen)
    writers = run_lib.open_writers(workdir, start_step, total_steps, config.batch_size)
    writer, progress = writers.metrics, writers.progress
    batches = (dp_run.train_batches(config, run.encoded["train"], position, start_step, dp_plan)
               if dp_plan else
               train_batches(config, run.encoded["train"], position, run.plan, with_fill=True))
    buffer, window = MetricsBuffer(strategy), []

    with ckpt:
        for step in range(start_step + 1, total_steps + 1):
            position, batch, tokens = next(batches)
            dev_state, metrics = run.train_step(dev_state, dev_frozen,
                                                strategy.shard_batch(batch))
            buffer.add(step, {**metrics,
                              "source_fill": tokens["source_tokens"] / tokens["source_slots"],
                              "target_fill": tokens["target_tokens"] / tokens["target_slots"]})
            do_log = due(step, config.log_every, total_steps)
            do_eval = run.eval_every > 0 and due(step, run.eval_every, total_steps)
            do_save = due(step, run.save_every, total_steps)
            if do_log or do_eval or do_save:
                window += run_lib.flush(buffer, ckpt)  # one host sync; NaN/inf raise
            if do_log:
                writer.write(step, {f"train/{k}": v for k, v in mean_metrics(window).items()})
                progress.update(step, window)
                window = []
            if do_eval:
                start = time.perf_counter()
                scores = run.evaluator.evaluate(eval_params(run, dev_state.params, dev_frozen),
                                                "validation")
                spent = dp_plan.spent(step) if dp_plan else {}  # (epsilon, delta) so far
                writer.write(step, {**{f"validation/{k}": v for k, v in scores.items()},
                                    **{f"privacy/{k}": v for k, v in spent.items()}})
                progress.note(f"step {step}: validation " + reporting.format_metrics(scores)
                              + f" ({time.perf_counter() - start:.1f}s)"
                              + (f"; DP epsilon {spent['epsilon']:.3f} at delta "
                                 f"{spent['delta']:.2g}" if spent else ""))
                # Refuses NaN/inf parameters; committed before the step checkpoint below.
                ckpt.save_best(step, strategy.unreplicate(dev_state.params), scores["score"],
                               {"config": config.to_dict()})
            if do_save:
                ckpt.save(step, strategy.unreplicate(dev_state),
                          {"data_position": position.to_dict(), "config": config.to_dict(),
                           "best_score": ckpt.best_score, "best_step": ckpt.best_step})
        progress.close()
        ckpt.wait()
        best = ckpt.restore_best(run.trainable)
    return _finish(config, workdir, run, ckpt, best, dev_state, dev_frozen, writers)


def _finish(config, workdir: Path, run: FineTuning, ckpt: Checkpointer, best, dev_state,
            dev_frozen, writers: run_lib.Writers) -> dict:
    """Test at the best validation checkpoint; export the adapter; the run's summary."""
    strategy, total_steps, task, method = run.strategy, run.total_steps, run.task, run.method
    best_params = best[0] if best else strategy.unreplicate(dev_state.params)
    best_step = int(best[1].get("step", total_steps)) if best else total_steps
    summary: dict[str, Any] = {
        "task": task.name, "method": method.name, "model": run.model_name,
        "trainable_params": run.counts[0], "total_params": run.counts[1],
        "steps": total_steps, "best_step": best_step, "best_validation_score": ckpt.best_score,
        "learning_rate": run.learning_rate, "train_examples": len(run.encoded["train"]),
        "method_config": method.to_dict(), "config": config.to_dict(),
        "processes": jax.process_count(), "devices": strategy.num_devices,
    }
    if run.dp_plan:
        summary["privacy"] = run.dp_plan.summary(total_steps)
    if ckpt.problems:
        summary["warnings"] = list(ckpt.problems)
    if history := workdir_lib.config_history(workdir):
        summary["config_history"] = history  # --config.allow_config_change resumes
    if config.eval_test and "test" in run.encoded:
        params = (method.combine(best_params, run.frozen) if jax.process_count() > 1 else
                  method.combine(strategy.one_copy(strategy.replicate(best_params)),
                                 strategy.one_copy(dev_frozen)))
        test = run.evaluator.evaluate(params, "test")
        writers.metrics.write(best_step, {f"test/{k}": v for k, v in test.items()})
        summary["test"] = test
    masks = run.masks
    peft.save_adapter(workdir / "adapter", best_params, method, model=run.model_name,
                      task=task.name, step=best_step, init_seed=config.seed,
                      backbone_sha256=run.backbone_sha256,
                      scan_layers=run.model.config.scan_layers,
                      max_source_length=config.max_source_length,
                      max_target_length=target_length(config, task, run.tokenizer),
                      add_task_prefix=run.add_prefix,
                      **({"vocab_size": run.vocab_size} if run.vocab_size is not None else {}),
                      **({"sparsity_masks": sparsity_lib.export_masks(best_params, masks)}
                         if masks is not None else {}))
    history = writers.metrics.read()
    summary["validation"] = next((h for h in reversed(history) if h["step"] == best_step
                                  and any(k.startswith("validation/") for k in h)), {})
    run_lib.write_summary(workdir, summary, table=True)
    if multihost.is_primary():
        reporting.plot_curves(history, workdir / "learning_curves.png",
                              title=f"{task.name} · {method.name} · {run.model_name}")
    writers.close()
    return summary
