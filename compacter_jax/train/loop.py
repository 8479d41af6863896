"""Host-side training loop: resumable data position, logging, evaluation, checkpoints.

Data contract: `batches(position)` returns an iterator of `(position_after, host_batch)`
starting at `position` and running on across epochs; `position_after` is where to restart
to continue right after that batch. A finite iterator ends training early.

On start, if the checkpointer holds a step, the loop restores the state and the data position
from it and continues, so an interrupted run resumed this way reproduces the uninterrupted one
(same state, batches and dropout keys).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from compacter_jax.data.pipeline import DataState
from compacter_jax.train.checkpoint import Checkpointer
from compacter_jax.train.parallel import Strategy
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import raise_if_nonfinite

log = logging.getLogger(__name__)


BatchSource = Callable[[DataState], Iterator[tuple[DataState, Mapping[str, np.ndarray]]]]
# eval_fn(device state, device frozen, step) -> metrics (floats), including `score_key`.
EvalFn = Callable[[Any, Any, int], Mapping[str, float]]


@dataclasses.dataclass
class LoopResult:
    state: Any                     # final TrainState, on devices (strategy layout)
    position: DataState         # data position after the last batch
    history: list[dict]            # per update: {"step": s, loss, tokens, grad_norm, ...}
    evals: list[dict]              # per evaluation: {"step": s, **eval metrics}
    best_score: float | None


def _log_window(step: int, window: list[dict]) -> None:
    mean = {k: float(np.mean([m[k] for m in window])) for k in window[-1] if k != "step"}
    log.info("step %d: %s", step, " ".join(f"{k}={v:.5g}" for k, v in sorted(mean.items())))


def train_loop(
    *,
    state: TrainState,
    frozen: Any,
    train_step: Callable,
    strategy: Strategy,
    batches: BatchSource,
    num_steps: int,
    checkpointer: Checkpointer | None = None,
    save_every: int = 0,
    eval_fn: EvalFn | None = None,
    eval_every: int = 0,
    eval_at_end: bool = True,
    score_key: str = "score",
    log_every: int = 50,
    log_fn: Callable[[int, list[dict]], None] = _log_window,
    config: Mapping[str, Any] | None = None,
) -> LoopResult:
    """Runs `train_step` until `state.step == num_steps` (or the batches run out).

    state: host TrainState at step 0 (also the template for restoring). frozen: host frozen
    tree (placed here with `strategy.put_frozen`). train_step: from `make_train_step`,
    uncompiled (compiled here with `strategy.compile_train_step`, state donated).
    Every `log_every` updates `log_fn(step, metrics since last log)`; every `eval_every`
    (and at the end with `eval_at_end`) `eval_fn`, keeping the best `score_key` params in
    `checkpointer`; every `save_every` (and at the end) a state checkpoint with the data
    position and `config` in its JSON meta. Metrics are checked for NaN/inf before every
    log, eval and save (`NonFiniteLossError`). 0 disables an interval.
    """
    position = DataState()
    if checkpointer is not None and (restored := checkpointer.restore_latest(state)):
        state, meta = restored
        position = DataState.from_dict(meta["data_position"])
        log.info("resumed from step %d at %s", int(state.step), position)
    step = int(np.asarray(state.step))
    history: list[dict] = []
    evals: list[dict] = []
    dev_state = strategy.replicate(state)
    dev_frozen = strategy.put_frozen(frozen)
    compiled = strategy.compile_train_step(train_step)
    pending: list[tuple[int, Any]] = []
    window: list[dict] = []

    def every(n: int) -> bool:
        return n > 0 and step % n == 0

    try:
        source = iter(batches(position))
        while step < num_steps:
            try:
                next_position, batch = next(source)
            except StopIteration:
                log.warning("batches ran out at step %d before num_steps=%d", step, num_steps)
                break
            dev_state, metrics = compiled(dev_state, dev_frozen, strategy.shard_batch(batch))
            step += 1
            position = next_position
            pending.append((step, metrics))
            last = step == num_steps
            do_eval = eval_fn is not None and (every(eval_every) or (last and eval_at_end))
            do_save = checkpointer is not None and (every(save_every) or last)
            if not (every(log_every) or do_eval or do_save or last):
                continue
            # one host sync per interval: fetch queued metrics, refuse non-finite ones
            records = [(s, strategy.unreplicate(m)) for s, m in pending]
            pending.clear()
            raise_if_nonfinite(records)
            for s, m in records:
                window.append({"step": s, **{k: float(v) for k, v in m.items()}})
            if every(log_every) or last:
                log_fn(step, window)
                history.extend(window)
                window = []
            if do_eval:
                result = {k: float(v) for k, v in eval_fn(dev_state, dev_frozen, step).items()}
                evals.append({"step": step, **result})
                if checkpointer is not None and score_key in result:
                    checkpointer.save_best(step, strategy.unreplicate(dev_state.params),
                                           result[score_key], {"config": dict(config or {})})
            if do_save:
                meta = {"data_position": position.to_dict(), "config": dict(config or {}),
                        "best_score": checkpointer.best_score}
                checkpointer.save(step, strategy.unreplicate(dev_state), meta)
        if pending:  # ran out of data between intervals
            records = [(s, strategy.unreplicate(m)) for s, m in pending]
            raise_if_nonfinite(records)
            window.extend({"step": s, **{k: float(v) for k, v in m.items()}} for s, m in records)
        history.extend(window)
    finally:
        if checkpointer is not None:
            checkpointer.wait()  # never leave a half-written async save behind
    best = checkpointer.best_score if checkpointer is not None else None
    return LoopResult(dev_state, position, history, evals, best)


def evaluate_loss(compiled_eval_step: Callable, strategy: Strategy, params: Any, frozen: Any,
                  batches: Iterator[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Mean token loss over host batches (padded rows masked by `example_mask`).

    `compiled_eval_step = strategy.compile_eval_step(make_eval_step(apply_fn))`; `params`
    and `frozen` are in the strategy's device layout (e.g. `state.params` inside `eval_fn`).
    Returns {"loss", "tokens", "examples"}.
    """
    totals = {"loss_sum": 0.0, "tokens": 0.0, "examples": 0.0}
    for batch in batches:
        sums = strategy.unreplicate(compiled_eval_step(params, frozen, strategy.shard_batch(batch)))
        for k in totals:
            totals[k] += float(sums[k])
    return {"loss": totals["loss_sum"] / max(totals["tokens"], 1.0),
            "tokens": totals["tokens"], "examples": totals["examples"]}
