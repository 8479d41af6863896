"""Orbax checkpoints of the training state, a best-on-validation record, and adapter export.

Layout of a run directory:

    <dir>/steps/<step>/{state, meta}   TrainState (trainable params, opt_state, step, rng) +
                                       JSON meta (data position, best score, config); keep N
    <dir>/best/<step>/{params, meta}   trainable params with the best validation score (keep 1)

The frozen backbone is never written: restore it from the pretrained checkpoint. Orbax writes a
step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an interrupted save is
never listed as a step. Saves are asynchronous; `wait()` before reading them back or exiting.
(The trained parameters alone, for loading onto a backbone later, are exported by
`compacter_jax.peft.save_adapter`.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax import serialization

from compacter_jax.host import to_host
from compacter_jax.train.state import TrainState


class Checkpointer:
    """Periodic TrainState checkpoints + best-on-validation params for one run directory.

    Args:
      directory: run directory (created).
      max_to_keep: number of most recent step checkpoints kept.
      best_mode: "max" (accuracy-like scores) or "min" (losses).
      async_save: write in a background thread (orbax default).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 best_mode: str = "max", async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.best_mode = best_mode

        def manager(sub: str, keep: int) -> ocp.CheckpointManager:
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save)
            return ocp.CheckpointManager(self.directory / sub, options=opts)

        self._steps = manager("steps", max_to_keep)
        self._best = manager("best", 1)
        self.best_score: float | None = None
        if (step := self._best.latest_step()) is not None:
            meta = self._best.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            self.best_score = float(meta.meta["score"])

    # ---- periodic state checkpoints ----
    def latest_step(self) -> int | None:
        """The newest fully written step, or None."""
        return self._steps.latest_step()

    def save(self, step: int, state: TrainState, meta: Mapping[str, Any]) -> bool:
        """Saves a host (unreplicated) `state` and JSON-serialisable `meta` at `step`.

        Returns False (and writes nothing) if `step` is already saved. Under pmap, pass
        `strategy.unreplicate(state)`.
        """
        if step in self._steps.all_steps():
            return False
        state_dict = to_host(serialization.to_state_dict(state))
        return self._steps.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(dict(meta))))

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
        """(state, meta) of the latest step, or None when there is none.

        `template` is a TrainState of the right structure, shapes and dtypes (e.g. a fresh
        `TrainState.create(...)`, unreplicated); leaves come back as numpy arrays.
        """
        step = self.latest_step()
        if step is None:
            return None
        target = to_host(serialization.to_state_dict(template))
        out = self._steps.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return serialization.from_state_dict(template, out.state), dict(out.meta)

    # ---- best on validation ----
    def is_better(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.best_mode == "max" else score < self.best_score

    def save_best(self, step: int, params: Any, score: float,
                  meta: Mapping[str, Any] | None = None) -> bool:
        """Saves the trainable `params` (host tree) if `score` beats the best so far."""
        if not self.is_better(score):
            return False
        if step in self._best.all_steps():  # same step re-evaluated: replace it
            self._best.wait_until_finished()
            self._best.delete(step)
        record = {**dict(meta or {}), "score": float(score), "step": int(step)}
        self._best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(to_host(params)), meta=ocp.args.JsonSave(record)))
        self.best_score = float(score)
        return True

    def restore_best(self, template_params: Any) -> tuple[Any, dict] | None:
        """(params, meta) of the best validation checkpoint, or None."""
        step = self._best.latest_step()
        if step is None:
            return None
        out = self._best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(to_host(template_params)),
            meta=ocp.args.JsonRestore()))
        return out.params, dict(out.meta)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._steps.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._steps.close()
        self._best.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
