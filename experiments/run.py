"""The scaffold every training CLI runs on: what a run does around its loop, written once.

    with run.claim_workdir(config, workdir):            # check, lock, clean, stored config
        state, meta = run.restore(ckpt, state, config)  # resume: state + data position
        writers = run.open_writers(workdir, start, total, examples_per_step)
        for step in ...:                                # the run's own loop, top-down
            ...
            window += run.flush(buffer, ckpt)           # the non-finite guard
        run.write_summary(workdir, summary)             # atomically, once, by process 0

`experiments.finetune`, `experiments.multitask` and `experiments.pretrain` write their loops
on these; each piece is here once, so every CLI takes the lock, resumes, tolerates a torn
metrics line and writes its summary atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from compacter_jax.train import Checkpointer, MetricsBuffer, NonFiniteLossError
from experiments import multihost, reporting
from experiments import workdir as workdir_lib

log = logging.getLogger(__name__)


@contextlib.contextmanager
def claim_workdir(config, workdir: Path) -> Iterator[None]:
    """Process 0 checks that every output can be written, locks the workdir (one run at a
    time), removes what a killed run left half-written and checks the config against the run
    the workdir holds; every process stops if any of that failed. The lock is released at
    exit.

    Args:
      config: the run's ConfigDict (`force_unlock`, `allow_config_change` are read if present).
      workdir: the run directory (created if missing).
    Raises:
      WorkdirError naming the path, the changed fields, or the lock's holder, and the fix.
    """
    lock, error = None, None
    if multihost.is_primary():
        try:
            workdir_lib.check_writable(workdir)
            lock = workdir_lib.WorkdirLock(workdir, force=config.get("force_unlock", False))
            lock.acquire()
            workdir_lib.remove_stale_temporaries(workdir)
            workdir_lib.check_resume_config(
                workdir, config.to_dict(), allow_change=config.get("allow_config_change", False))
        except Exception as e:  # every process must hear of it before anyone raises
            error = e
            if lock is not None:
                lock.release()
    if not multihost.agree(error is None):
        raise error if error is not None else workdir_lib.WorkdirError(
            f"process 0 refused workdir {workdir}: see its error")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def restore(ckpt: Checkpointer, state: Any, config, *,
            refuse: Callable[[Mapping[str, tuple[Any, Any]]], None] | None = None
            ) -> tuple[Any, dict | None]:
    """The latest step checkpoint that restores (a corrupt one is set aside and the one before
    it used), or `(state, None)` to start. The config that checkpoint was trained with (its
    meta's `config`) must match `config` but for operational fields, unless
    `allow_config_change`; `refuse(changes)` may refuse more (e.g. a changed DP mechanism).

    Returns:
      (state, meta): the restored TrainState and its JSON meta (data position ...), or the
      given `state` and None.
    Raises:
      WorkdirError naming the changed fields and the fix.
    """
    restored = ckpt.restore_latest(state)
    if restored is None:
        return state, None
    state, meta = restored
    if isinstance(meta.get("config"), dict):
        changes = workdir_lib.config_changes(meta["config"], config.to_dict())
        if refuse is not None:
            refuse(changes)
        workdir_lib.refuse_or_allow(changes, config.get("allow_config_change", False),
                                    f"checkpoint step {int(state.step)}")
    log.info("resumed from step %d", int(state.step))
    return state, meta


@dataclasses.dataclass
class Writers:
    """What a run writes as it goes: `metrics` (metrics.jsonl + TensorBoard, process 0 only)
    and `progress` (a tqdm bar, process 0 only)."""

    metrics: reporting.MetricsWriter
    progress: reporting.Progress

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()


def open_writers(workdir: Path, start_step: int, total_steps: int,
                 examples_per_step: int) -> Writers:
    """The writers of a run (re)started at `start_step`: metrics.jsonl is cut back to the
    records of steps <= `start_step` (those after it are recomputed; a torn last line goes),
    and the progress bar starts there."""
    primary = multihost.is_primary()
    metrics = reporting.MetricsWriter(workdir, enabled=primary)
    if (dropped := metrics.resume_at(start_step)):
        log.info("%s: dropped %d record(s) after step %d (they are recomputed)",
                 reporting.METRICS_FILE, dropped, start_step)
    progress = reporting.Progress(total_steps, examples_per_step, start_step, enabled=primary)
    return Writers(metrics, progress)


def flush(buffer: MetricsBuffer, ckpt: Checkpointer) -> list[dict[str, float]]:
    """`buffer.flush()` (one host sync), the non-finite guard: on a NaN/inf loss, first sets
    aside the step checkpoints from the state that loss was computed from (update N's loss
    comes from the state after update N-1: it diverged), so a re-run does not resume it.

    Raises:
      NonFiniteLossError (a FloatingPointError) naming the update.
    """
    try:
        return buffer.flush()
    except NonFiniteLossError as e:
        ckpt.set_aside_from(e.step - 1, "the loss of the next update was non-finite")
        raise


def write_summary(workdir: Path, summary: dict[str, Any], *, table: bool = False) -> None:
    """Writes WORKDIR/summary.json atomically on process 0 (others write nothing); `table`:
    also print the fine-tuning summary table (`reporting.write_summary`)."""
    if multihost.is_primary():
        reporting.write_summary(workdir, summary, table=table)
