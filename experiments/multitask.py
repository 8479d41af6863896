r"""Train one adapter per task in one job, on one frozen backbone.

  python -m experiments.multitask --config experiments/configs/multitask.py \
      --config.tasks=rte,mrpc,cola --workdir runs/glue3

`train_and_evaluate(config, workdir)` reads top-down, as experiments/finetune.py:

  tasks and their data -> T5 + method -> a bank of K adapters (trainable, [K, ...]) + the
  frozen backbone -> K optimizers, one joint train step -> resume -> the loop (joint batches,
  logging, per-task evaluation and best checkpoints, joint checkpoints) -> per task: test at
  its best validation checkpoint, adapter export, predictions -> metrics, summary, plots.

The sampling rule: every step holds `batch_size` examples of *each* task that is still
training, drawn exactly as a single-task run draws them (`data.train_batches` with the same
seed), so task k sees the batches of its own `experiments.glue` run. A task trains for its own
number of steps (`schedule_length`: its epochs, or `max_steps`) with its own schedule,
optimizer state, clipping and loss normalisation (`compacter_jax.train.multitask`); once it has
finished, it sends no examples and its adapter is left alone. Packed (the method permitting),
the rows of one step are packed with one row per task at most sharing (`pack_batch` with
`task_ids`), in shapes fitted to the run's joint batches.

The workdir gets: `adapters/<task>/` (a `save_adapter` export each, loadable with
`peft.load_adapter`), `predictions/<task>/{validation,test}.jsonl`, `metrics.jsonl` (keys
`train/...` for the joint step, `<task>/train/...`, `<task>/validation/...`,
`<task>/test/...`), `checkpoints/steps/` (the joint TrainState and every task's data
position), `checkpoints/<task>/best/` (its best validation adapter), `summary.json` and
`learning_curves_<task>.png`. Re-running with the same workdir resumes where it stopped, with
the result of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.data import joint as joint_lib
from compacter_jax.peft import bank as bank_lib
from compacter_jax.train import (Checkpointer, MetricsBuffer, due,
                                 make_optimizer, make_strategy, mean_metrics, seq2seq_apply_fn)
from compacter_jax.train.multitask import (init_multitask_state, make_multitask_train_step,
                                           slice_tree)
from experiments import backbone, cli, finetune, multihost, reporting
from experiments import run as run_lib
from experiments import spec as spec_lib
from experiments.evaluation import Evaluator

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- tasks


def task_names(config) -> list[str]:
    """The registry names of `config.tasks` ("rte,mrpc" or a sequence), in order.

    Raises ValueError for an empty list, an unknown name (listing the valid ones) or a task
    given twice."""
    raw = config.tasks
    items = raw.split(",") if isinstance(raw, str) else list(raw or ())
    names = [data_lib.get_task(n.strip()).name for n in items if str(n).strip()]
    if not names:
        raise ValueError("--config.tasks is empty: list the tasks, e.g. "
                         "--config.tasks=rte,mrpc,cola")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--config.tasks lists {twice} more than once; each task gets one "
                         "adapter")
    return names


@dataclasses.dataclass
class TaskRun:
    """One task of the job: its slice `index` of the bank, data and schedule.

    Attributes:
      encoded: {"train", "validation", "test"} tokenised splits.
      per_epoch / total_steps / eval_every: as a single-task run of it computes them
        (eval_every 0 = never).
      max_target_length: its target length (label length, or the config's).
    """

    index: int
    name: str
    task: data_lib.Task
    encoded: dict[str, data_lib.EncodedData]
    per_epoch: int
    total_steps: int
    eval_every: int
    max_target_length: int


def prepare_tasks(config, spec: spec_lib.FineTuneSpec, names: list[str], tokenizer
                  ) -> list[TaskRun]:
    """Each task's data and schedule, exactly as `experiments.finetune` prepares them."""
    runs = []
    for index, name in enumerate(names):
        task = data_lib.get_task(name)
        encoded = finetune.load_data(config, task, tokenizer, spec.add_task_prefix)
        per_epoch = data_lib.steps_per_epoch(len(encoded["train"]), config.batch_size)
        total, _ = spec.schedule(task.is_small, per_epoch)
        eval_every = spec.eval_period(per_epoch)
        runs.append(TaskRun(index, name, task, encoded, per_epoch, total, eval_every,
                            finetune.target_length(config, task, tokenizer)))
        log.info("%s: %d training rows, %d steps (%d per epoch)", name, len(encoded["train"]),
                 total, per_epoch)
    return runs


# --------------------------------------------------------------------- joint batches


def train_batches(config, runs: list[TaskRun], positions: dict[str, data_lib.DataState],
                  start_step: int, plan: data_lib.PackingPlan | None):
    """(data positions after, this host's slice of the joint batch) of steps start_step+1, ...
    (`compacter_jax.data.joint`). A task's stream stops at its last step, so its position
    stays where it ended."""
    stream = joint_lib.joint_train_batches(
        [r.encoded["train"] for r in runs], [r.total_steps for r in runs], config.batch_size,
        seed=config.seed, target_width=max(r.max_target_length for r in runs),
        positions=[positions[r.name] for r in runs], start_step=start_step, plan=plan)
    for after, joint in stream:
        yield ({r.name: p for r, p in zip(runs, after)},
               data_lib.shard_for_host(joint, jax.process_index(), jax.process_count()))


def joint_packing_plan(config, method: peft.Method, runs: list[TaskRun],
                       num_devices: int) -> data_lib.PackingPlan | None:
    """Packed shapes for the joint batches of the run (`data.joint.joint_packing_plan` over
    each task's own `finetune.packing_plan`), or None (padded batches)."""
    plans = [finetune.packing_plan(config, method, r.encoded["train"],
                                   math.ceil(r.total_steps / r.per_epoch), num_devices)
             for r in runs]
    if plans[0] is None:
        return None
    return joint_lib.joint_packing_plan(
        [r.encoded["train"] for r in runs], [r.total_steps for r in runs], config.batch_size,
        seed=config.seed, task_plans=plans, multiple_of=num_devices,
        max_buckets=config.packing_row_buckets)


# ------------------------------------------------------------------------- the run


def _task_history(history: list[dict], name: str) -> list[dict]:
    """One task's events with its prefix removed (for `reporting.plot_curves`)."""
    prefix = f"{name}/"
    out = []
    for record in history:
        own = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
        if own:
            out.append({"step": record["step"], **own})
    return out


def _train_record(window: list[dict], names: list[str]) -> dict[str, float]:
    """The logged train metrics of a window: the joint ones, and each task's over the steps
    where it was still training."""
    joint = mean_metrics([{k: v for k, v in r.items() if "/" not in k} for r in window])
    out = {f"train/{k}": v for k, v in joint.items() if k != "finite"}
    for name in names:
        mine = [{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(f"{name}/")}
                for r in window if r.get(f"{name}/active", 0.0) > 0]
        if mine:
            out.update({f"{name}/train/{k}": v for k, v in mean_metrics(mine).items()
                        if k != "active"})
    return out


@dataclasses.dataclass
class JointRun:
    """Everything the joint loop uses, built by `build` before the first step."""

    method: peft.Method
    runs: list[TaskRun]
    model: Any
    model_name: str
    trainable: Any  # one adapter (the template of a bank slice)
    frozen: Any
    bank: Any  # K adapters stacked on a leading task axis (shared leaves single)
    shared: frozenset  # paths of the leaves one for all tasks (multi-task ATTEMPT's attention)
    counts: tuple[int, int]  # (trainable per task, frozen) parameters
    vocab_size: int | None
    init_rng: Any
    strategy: Any
    plan: data_lib.PackingPlan | None
    txs: list
    shared_tx: Any  # the shared leaves' optimizer (None without shared leaves)
    learning_rate: float
    add_prefix: bool
    train_step: Any
    evaluators: dict[str, Evaluator]
    save_every: int

    @property
    def last_step(self) -> int:
        return max(r.total_steps for r in self.runs)


def build(config, spec: spec_lib.FineTuneSpec, workdir: Path, names: list[str]) -> JointRun:
    """Tasks and their data, one backbone and adapter init (as each single-task run with this
    seed draws them), K optimizers (own schedule length each), the joint step, the packing
    plan and the evaluators."""
    method, add_prefix = spec.method, spec.add_task_prefix
    if type(method).shared_across_tasks is peft.Method.shared_across_tasks:
        bank_lib.check_bankable(method)  # early: no leaf is shared, so none can save it
    resolved = backbone.resolve_model(config)
    learning_rate = spec.learning_rate_for(resolved[1])
    tokenizer = backbone.load_tokenizer_for(config, *resolved)
    runs = prepare_tasks(config, spec, names, tokenizer)
    init_rng = jax.random.PRNGKey(config.seed)
    vocab_size = backbone.tokenizer_vocab_size(config, tokenizer)
    model, params, model_name = backbone.load_model(config, method, init_rng, resolved=resolved,
                                                    vocab_size=vocab_size)
    backbone.check_tokenizer_fits(tokenizer, model)
    trainable, frozen = method.partition(params)
    del params
    shared = bank_lib.shared_paths(method, trainable)
    bank_lib.check_bankable(method, shared)
    counts = (peft.count(trainable), peft.count(frozen))
    log.info("model %s, method %s: %d adapters of %s params on %s frozen ones", model_name,
             method.name, len(runs), f"{counts[0]:,}", f"{counts[1]:,}")
    devices = jax.devices()[:spec.devices] if spec.devices else None
    strategy = make_strategy(config.strategy, devices, shard_frozen=config.shard_frozen)
    optimizers = [make_optimizer(learning_rate, config.warmup_steps, r.total_steps,
                                 weight_decay=config.weight_decay, clip_norm=spec.clip_norm,
                                 optimizer=config.optimizer)
                  for r in runs]
    # Shared leaves: one optimizer over the whole run (the longest task's length).
    shared_tx = make_optimizer(
        learning_rate, config.warmup_steps, max(r.total_steps for r in runs),
        weight_decay=config.weight_decay, clip_norm=spec.clip_norm,
        optimizer=config.optimizer)[0] if shared else None
    bank_apply = bank_lib.make_bank_apply(seq2seq_apply_fn(model), method, shared)
    train_step = strategy.compile_train_step(make_multitask_train_step(
        bank_apply, [tx for tx, _ in optimizers], total_steps=[r.total_steps for r in runs],
        names=names, schedules=[s for _, s in optimizers], shared=shared, shared_tx=shared_tx))
    evaluators = {r.name: Evaluator(r.task, tokenizer, model,
                                    {k: v for k, v in r.encoded.items() if k != "train"},
                                    config.eval_batch_size, r.max_target_length,
                                    mode=config.eval_mode,
                                    predictions_dir=workdir / "predictions" / r.name)
                  for r in runs}
    save_every = spec.save_every or min(r.eval_every or r.per_epoch for r in runs)
    return JointRun(
        method=method, runs=runs, model=model, model_name=model_name, trainable=trainable,
        frozen=frozen, bank=bank_lib.stack_adapters([trainable] * len(runs), shared),
        shared=shared, shared_tx=shared_tx, counts=counts,
        vocab_size=vocab_size, init_rng=init_rng, strategy=strategy,
        plan=joint_packing_plan(config, method, runs, strategy.num_devices),
        txs=[tx for tx, _ in optimizers], learning_rate=learning_rate, add_prefix=add_prefix,
        train_step=train_step, evaluators=evaluators, save_every=save_every)


# ------------------------------------------------------------------------------ main


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) one multi-task job in `workdir`; returns the summary dict.

    As `experiments.glue`: the config is validated before anything is loaded (a field the
    run does not know, e.g. `task`, is refused), the workdir is checked writable and locked,
    and a resume must match the config it resumes.
    """
    check_config(config)
    names = task_names(config)
    spec_lib.validate_config(config, available_devices=len(jax.devices()),
                             processes=jax.process_count())
    workdir = Path(workdir).expanduser().absolute()
    spec = spec_lib.finetune_spec(config)
    with run_lib.claim_workdir(config, workdir):
        return _train_jointly(config, spec, workdir, names)


def _train_jointly(config: ml_collections.ConfigDict, spec: spec_lib.FineTuneSpec,
                   workdir: Path, names: list[str]) -> dict:
    """The run itself, top-down, in a claimed workdir."""
    job = build(config, spec, workdir, names)
    strategy, runs, method, last_step = job.strategy, job.runs, job.method, job.last_step
    # Resume: the joint state and every task's data position, or start.
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    best = {r.name: Checkpointer(workdir / "checkpoints" / r.name, max_to_keep=1) for r in runs}
    state = init_multitask_state(job.bank, job.txs, jax.random.fold_in(job.init_rng, 1),
                                 shared=job.shared, shared_tx=job.shared_tx)
    state, meta = run_lib.restore(ckpt, state, config)
    positions = ({n: data_lib.DataState.from_dict(p) for n, p in meta["data_positions"].items()}
                 if meta else {r.name: data_lib.DataState() for r in runs})
    start_step = int(state.step)
    dev_state, dev_frozen = strategy.replicate(state), strategy.put_frozen(job.frozen)
    writers = run_lib.open_writers(workdir, start_step, last_step, config.batch_size * len(runs))
    writer, progress = writers.metrics, writers.progress
    batches = train_batches(config, runs, positions, start_step, job.plan)
    buffer, window = MetricsBuffer(strategy), []

    with contextlib.ExitStack() as stack:
        for c in (ckpt, *best.values()):
            stack.enter_context(c)
        for step in range(start_step + 1, last_step + 1):
            positions, batch = next(batches)
            dev_state, metrics = job.train_step(dev_state, dev_frozen,
                                                strategy.shard_batch(batch))
            tokens = data_lib.fill(batch)
            buffer.add(step, {**metrics,
                              "source_fill": tokens["source_tokens"] / tokens["source_slots"],
                              "target_fill": tokens["target_tokens"] / tokens["target_slots"]})
            evaluating = [r for r in runs if r.eval_every > 0 and step <= r.total_steps
                          and due(step, r.eval_every, r.total_steps)]
            do_log = due(step, config.log_every, last_step)
            do_save = due(step, job.save_every, last_step)
            if do_log or evaluating or do_save:
                window += run_lib.flush(buffer, ckpt)  # one host sync; NaN/inf raise
            if do_log:
                writer.write(step, _train_record(window, names))
                progress.update(step, window)
                window = []
            for run in evaluating:
                start = time.perf_counter()
                params = method.combine(
                    slice_tree(strategy.one_copy(dev_state.params), run.index, job.shared),
                    strategy.one_copy(dev_frozen))
                scores = job.evaluators[run.name].evaluate(params, "validation")
                writer.write(step, {f"{run.name}/validation/{k}": v for k, v in scores.items()})
                progress.note(f"step {step}: {run.name} validation "
                              + reporting.format_metrics(scores)
                              + f" ({time.perf_counter() - start:.1f}s)")
                best[run.name].save_best(
                    step, slice_tree(strategy.unreplicate(dev_state.params), run.index,
                                     job.shared),
                    scores["score"], {"config": config.to_dict(), "task": run.name})
            if do_save:
                ckpt.save(step, strategy.unreplicate(dev_state),
                          {"data_positions": {n: p.to_dict() for n, p in positions.items()},
                           "config": config.to_dict(),
                           "best_scores": {n: c.best_score for n, c in best.items()}})
        progress.close()
        for c in (ckpt, *best.values()):
            c.wait()
        restored = {r.name: (best[r.name].restore_best(job.trainable), best[r.name].best_score)
                    for r in runs}
    return _finish(config, workdir, job, restored, dev_state, dev_frozen, writers)


def _finish(config, workdir: Path, job: JointRun, restored: dict, dev_state, dev_frozen,
            writers: run_lib.Writers) -> dict:
    """Per task: test at its best validation checkpoint, export its adapter; the summary."""
    strategy, method = job.strategy, job.method
    final = strategy.unreplicate(dev_state.params)
    history = writers.metrics.read()
    summary: dict[str, Any] = {
        "tasks": {}, "method": method.name, "model": job.model_name,
        "trainable_params_per_task": job.counts[0], "frozen_params": job.counts[1],
        "steps": job.last_step, "learning_rate": job.learning_rate,
        "method_config": method.to_dict(), "packed": job.plan is not None,
        "config": config.to_dict(),
    }
    for run in job.runs:
        found, best_score = restored[run.name]
        best_params = found[0] if found else slice_tree(final, run.index, job.shared)
        best_step = int(found[1].get("step", run.total_steps)) if found else run.total_steps
        record: dict[str, Any] = {
            "steps": run.total_steps, "best_step": best_step,
            "best_validation_score": best_score,
            "train_examples": len(run.encoded["train"]),
            "validation": next((
                {k.split("/", 2)[2]: v for k, v in h.items()
                 if k.startswith(f"{run.name}/validation/")}
                for h in reversed(history) if h["step"] == best_step
                and any(k.startswith(f"{run.name}/validation/") for k in h)), {}),
        }
        if config.eval_test and "test" in run.encoded:
            params = method.combine(strategy.one_copy(strategy.replicate(best_params)),
                                    strategy.one_copy(dev_frozen))
            test = job.evaluators[run.name].evaluate(params, "test")
            writers.metrics.write(best_step, {f"{run.name}/test/{k}": v for k, v in test.items()})
            record["test"] = test
        peft.save_adapter(workdir / "adapters" / run.name, best_params, method,
                          model=job.model_name, task=run.name, step=best_step,
                          init_seed=config.seed, max_source_length=config.max_source_length,
                          max_target_length=run.max_target_length,
                          add_task_prefix=job.add_prefix,
                          **({"vocab_size": job.vocab_size} if job.vocab_size is not None
                             else {}))
        summary["tasks"][run.name] = record
        if multihost.is_primary():
            reporting.plot_curves(_task_history(history, run.name),
                                  workdir / f"learning_curves_{run.name}.png",
                                  title=f"{run.name} · {method.name} · {job.model_name} "
                                        "(multi-task)")
    run_lib.write_summary(workdir, summary)
    for name, record in summary["tasks"].items():
        print(f"| {name:<10} | best step {record['best_step']:>6} | validation "
              f"{reporting.format_metrics(record['validation'])} | test "
              f"{reporting.format_metrics(record.get('test', {}))} |", flush=True)
    writers.close()
    return summary


# ------------------------------------------------------------------------------- CLI


def check_config(config: ml_collections.ConfigDict) -> None:
    """The checks that need no JAX backend: every field known and present (`--config.task` is
    refused: the job's tasks are `tasks`), the task list, every value usable."""
    spec_lib.check_fields(config, spec_lib.multitask_defaults())
    task_names(config)
    spec_lib.validate_config(config)
    if spec_lib.dp_enabled(config):
        raise spec_lib.ConfigError("--config.dp.*: multi-task runs do not train with "
                                   "differential privacy; leave --config.dp unset, or train "
                                   "each task with experiments.glue")
    if config.get("source_bucket", 0):
        raise spec_lib.ConfigError(f"--config.source_bucket={config.source_bucket}: multi-task "
                                   "batches keep one source width; leave it 0")


if __name__ == "__main__":
    cli.main(train_and_evaluate, "experiments/configs/multitask.py", check=check_config,
             workdir_help="Directory for adapters, checkpoints, metrics and predictions.",
             config_help="Multi-task config file (ml_collections).")
