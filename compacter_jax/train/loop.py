"""Building blocks of a training loop. The loop itself is written out, top-down, in each
experiment's `train_and_evaluate` (as flax examples/wmt does):

    buffer = MetricsBuffer(strategy)
    for step in range(int(state.step) + 1, total_steps + 1):
        position, batch = next(batches)
        dev_state, metrics = compiled_step(dev_state, dev_frozen, strategy.shard_batch(batch))
        buffer.add(step, metrics)
        if due(step, log_every, total_steps):
            records = buffer.flush()  # one host sync per interval; raises on NaN/inf
            ...

A resumed run is the uninterrupted one when its state and its data position come from the
same checkpoint (`Checkpointer.restore_latest`; the data position is an opaque JSON-able
value stored in the checkpoint's meta), the batches are a pure function of that position and
the dropout key of a step derives from (rng, step) (`TrainState`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from compacter_jax.train.parallel import Strategy
from compacter_jax.train.step import raise_if_nonfinite


def due(step: int, every: int, last_step: int | None = None) -> bool:
    """True every `every` steps (0 or less: never) and at `last_step`."""
    return (every > 0 and step % every == 0) or step == last_step


class MetricsBuffer:
    """Device metrics of the steps since the last flush; `flush` fetches them in one host sync
    and refuses non-finite ones (`NonFiniteLossError`) before anything is saved."""

    def __init__(self, strategy: Strategy):
        self.strategy = strategy
        self._pending: list[tuple[int, Any]] = []

    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._pending.append((step, metrics))

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> list[dict[str, float]]:
        """[{"step": s, metric: float, ...}] of every pending step, oldest first."""
        records = [(s, self.strategy.unreplicate(m)) for s, m in self._pending]
        self._pending.clear()
        raise_if_nonfinite(records)
        return [{"step": s, **{k: float(v) for k, v in m.items()}} for s, m in records]


def mean_metrics(records: list[Mapping[str, float]]) -> dict[str, float]:
    """The mean of each metric (but `step`) over `records` (e.g. one logging interval)."""
    keys = [k for k in records[-1] if k != "step"] if records else []
    return {k: float(np.mean([r[k] for r in records if k in r])) for k in keys}


def evaluate_loss(compiled_eval_step: Callable, strategy: Strategy, params: Any, frozen: Any,
                  batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float]:
    """Mean token loss over host batches (padded rows masked by `example_mask`).

    `compiled_eval_step = strategy.compile_eval_step(make_eval_step(apply_fn, merge_fn=...))`;
    `params` and `frozen` are in the strategy's device layout. Returns {"loss", "tokens",
    "examples"}.
    """
    totals = {"loss_sum": 0.0, "tokens": 0.0, "examples": 0.0}
    for batch in batches:
        sums = strategy.unreplicate(compiled_eval_step(params, frozen,
                                                       strategy.shard_batch(batch)))
        for k in totals:
            totals[k] += float(sums[k])
    return {"loss": totals["loss_sum"] / max(totals["tokens"], 1.0), "tokens": totals["tokens"],
            "examples": totals["examples"]}
