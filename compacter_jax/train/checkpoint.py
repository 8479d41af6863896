"""Orbax checkpoints of the training state and a best-on-validation record.

Layout of a run directory:

    <dir>/steps/<step>/{state, meta}   TrainState (trainable params, opt_state, step, rng) +
                                       JSON meta (data position, best score, config); keep N
    <dir>/best/<step>/{params, meta}   trainable params with the best validation score (keep 1)
    <dir>/set_aside/<kind>-<step>-<time>   checkpoints that failed to restore (kept, not deleted)

The frozen backbone is never written: restore it from the pretrained checkpoint. Orbax writes a
step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so an interrupted save is
never listed as a step. Saves are asynchronous; `wait()` before reading them back or exiting.

Guarantees:
- Nothing non-finite is written: `save` / `save_best` raise `NonFiniteStateError` instead.
- Commit order: a step save starts only after every pending best save has committed, so when
  step N is on disk, so is the best record of every evaluation up to N. A resume from step N
  therefore never sees an older best than the uninterrupted run had at N (it may see a newer
  one, from evaluations after N; the resumed run re-evaluates them to the same scores, which
  do not beat it, so the outcome is the same).
- A checkpoint that does not restore (truncated or corrupt files, an emptied step directory,
  non-finite values) is reported, moved to `set_aside/` and the previous one is used.
(The trained parameters alone, for loading onto a backbone later, are exported by
`compacter_jax.peft.save_adapter`.)
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import serialization

from compacter_jax.host import nonfinite_leaves, to_host
from compacter_jax.train.state import TrainState

log = logging.getLogger(__name__)
SET_ASIDE = "set_aside"


class NonFiniteStateError(FloatingPointError):
    """Parameters (or optimizer state) hold NaN/inf: refused before anything is written."""

    def __init__(self, what: str, step: int, leaves: list[str]):
        self.step, self.leaves = step, leaves
        super().__init__(
            f"non-finite values in the {what} at step {step} ({', '.join(leaves[:3])}"
            f"{', ...' if len(leaves) > 3 else ''}); nothing was written for that step. The "
            "update overflowed: lower the learning rate (it must stay well inside float32) or "
            "check the data")


def _quiet_closed_loop_noise() -> None:
    """After a failed orbax restore, tensorstore callbacks still fire into orbax's closed asyncio
    loop and print "Event loop is closed" tracebacks (sys.unraisablehook); drop just those."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text.splitlines()[0][:300]


class Checkpointer:
    """Periodic TrainState checkpoints + best-on-validation params for one run directory.

    Args:
      directory: run directory (created).
      max_to_keep: number of most recent step checkpoints kept.
      best_mode: "max" (accuracy-like scores) or "min" (losses).
      async_save: write in a background thread (orbax default).

    Attributes:
      best_score: the best validation score on disk (None: no best record).
      problems: one message per checkpoint that was set aside (for the run's summary).
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
                 best_mode: str = "max", async_save: bool = True):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.best_mode = best_mode
        self.problems: list[str] = []

        def manager(sub: str, keep: int) -> ocp.CheckpointManager:
            opts = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                enable_async_checkpointing=async_save)
            return ocp.CheckpointManager(self.directory / sub, options=opts)

        self._steps = manager("steps", max_to_keep)
        self._best = manager("best", 1)
        self.best_score: float | None = None
        self.best_step: int | None = None
        while (step := self._best.latest_step()) is not None:
            try:
                meta = self._best.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))
                self.best_score, self.best_step = float(meta.meta["score"]), step
                break
            except Exception as e:  # corrupt meta: set it aside, there is no older best
                self._set_aside("best", step, e)

    # ---- periodic state checkpoints ----
    def latest_step(self) -> int | None:
        """The newest fully written step, or None."""
        return self._steps.latest_step()

    def save(self, step: int, state: TrainState, meta: Mapping[str, Any]) -> bool:
        """Saves a host (unreplicated) `state` and JSON-serialisable `meta` at `step`.

        Returns False (and writes nothing) if `step` is already saved. Raises
        `NonFiniteStateError` (and writes nothing) if the params or optimizer state hold
        NaN/inf. Under pmap, pass `strategy.unreplicate(state)`.
        """
        if step in self._steps.all_steps():
            return False
        state_dict = to_host(serialization.to_state_dict(state))
        bad = nonfinite_leaves(state_dict)
        if bad:
            raise NonFiniteStateError("training state", step, bad)
        self._best.wait_until_finished()  # commit order: best N before step N
        return self._steps.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state_dict), meta=ocp.args.JsonSave(dict(meta))))

    def restore_latest(self, template: TrainState) -> tuple[TrainState, dict] | None:
        """(state, meta) of the newest step that restores, or None when there is none.

        `template` is a TrainState of the right structure, shapes and dtypes (e.g. a fresh
        `TrainState.create(...)`, unreplicated); leaves come back as numpy arrays. A step that
        fails to restore or holds non-finite values is logged, moved to `set_aside/`, and the
        previous step is tried.
        """
        target = to_host(serialization.to_state_dict(template))
        while (step := self.latest_step()) is not None:
            try:
                out = self._steps.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
                bad = nonfinite_leaves(out.state)
                if bad:
                    raise NonFiniteStateError("restored training state", step, bad)
                return serialization.from_state_dict(template, out.state), dict(out.meta)
            except Exception as e:
                self._set_aside("steps", step, e)
        return None

    # ---- best on validation ----
    def is_better(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.best_mode == "max" else score < self.best_score

    def save_best(self, step: int, params: Any, score: float,
                  meta: Mapping[str, Any] | None = None) -> bool:
        """Saves the trainable `params` (host tree) if `score` beats the best so far. Raises
        `NonFiniteStateError` (writing nothing) if they hold NaN/inf."""
        if not self.is_better(score):
            return False
        params = to_host(params)
        bad = nonfinite_leaves(params)
        if bad:
            raise NonFiniteStateError("parameters", step, bad)
        if step in self._best.all_steps():  # same step re-evaluated: replace it
            self._best.wait_until_finished()
            self._best.delete(step)
        record = {**dict(meta or {}), "score": float(score), "step": int(step)}
        self._best.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(record)))
        self.best_score, self.best_step = float(score), int(step)
        return True

    def restore_best(self, template_params: Any) -> tuple[Any, dict] | None:
        """(params, meta) of the best validation checkpoint, or None (no best record, or it
        failed to restore: then it is logged, moved to `set_aside/` and `best_score` reset)."""
        step = self._best.latest_step()
        if step is None:
            return None
        try:
            out = self._best.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(to_host(template_params)),
                meta=ocp.args.JsonRestore()))
            bad = nonfinite_leaves(out.params)
            if bad:
                raise NonFiniteStateError("restored best parameters", step, bad)
            return out.params, dict(out.meta)
        except Exception as e:
            self._set_aside("best", step, e)
            self.best_score = self.best_step = None
            return None

    # ---- failures ----
    def set_aside_from(self, step: int, reason: str) -> list[int]:
        """Moves every step checkpoint at or after `step` to `set_aside/` (e.g. the state a
        non-finite loss was computed from: it diverged), so a re-run does not resume it.
        Returns the steps moved."""
        self.wait()
        moved = [s for s in self._steps.all_steps() if s >= step]
        for s in sorted(moved):
            self._set_aside("steps", s, RuntimeError(reason))
        return moved

    def _set_aside(self, kind: str, step: int, error: BaseException) -> None:
        """Moves `<kind>/<step>` to `set_aside/` (process 0; the others wait) and reloads."""
        _quiet_closed_loop_noise()
        manager = self._steps if kind == "steps" else self._best
        src = self.directory / kind / str(step)
        dst = self.directory / SET_ASIDE / f"{kind}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            while dst.exists():
                dst = dst.with_name(dst.name + "+")
            os.replace(src, dst)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"compacter_set_aside_{kind}_{step}")
        manager.reload()
        message = (f"checkpoint {src} is unusable ({_first_line(error)}); moved to {dst}"
                   + ("; using the previous step" if kind == "steps" else
                      "; the run has no best record until the next evaluation"))
        log.warning(message)
        self.problems.append(message)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written."""
        self._best.wait_until_finished()
        self._steps.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._steps.close()
        self._best.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
