"""Joint batches of several tasks (multi-task training of one adapter per task).

Every step holds `batch_size` examples of *each* task still training, drawn exactly as a
single-task run draws them (`pipeline.train_batches` with the same seed), plus `task_ids` [rows]
(the task of each row: the bank slice `peft.bank` applies to it). A task trains for its own
number of steps; once finished, it sends no examples and its data position stays where it ended.

    for positions, batch in joint_train_batches(trains, [4, 6], 8, seed=42):
        ...                       # positions[k]: task k's DataState after this step

Padded, task k fills rows k*B..(k+1)*B-1 (a short or finished task with empty rows), so the
shape never changes; packed (`plan`), the real rows of the active tasks are packed with one
task per row.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from compacter_jax.data import packing as packing_lib
from compacter_jax.data import pipeline

TASK_IDS = "task_ids"  # the batch key `compacter_jax.peft.bank` reads (int32 [rows])
_TARGET_KEYS = ("labels", "decoder_input_ids", "decoder_attention_mask")


def widen_targets(batch: Mapping[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """The target arrays [B, T] padded with masked zeros to [B, width] (tasks differ in target
    length; padding after the real tokens changes no real position)."""
    out = dict(batch)
    for key in _TARGET_KEYS:
        pad = width - out[key].shape[1]
        if pad:
            out[key] = np.pad(out[key], ((0, 0), (0, pad)))
    return out


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _empty_batch(train: pipeline.EncodedData) -> dict[str, np.ndarray]:
    template = pipeline.make_batch(train, np.zeros(1, np.int64))
    return {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in template.items()}


def joint_batch(trains: Sequence[pipeline.EncodedData], batches: Sequence[dict | None],
                batch_size: int, target_width: int,
                plan: packing_lib.PackingPlan | None = None) -> dict[str, np.ndarray]:
    """One step's global batch from each task's batch (None: that task has finished).

    Args:
      trains: each task's training data (for the empty rows of a finished task).
      batches: each task's batch of this step, or None.
      batch_size: the rows of each task in a padded batch.
      target_width: the widest target length of the tasks.
      plan: packed shapes, or None for padded batches.
    Returns:
      the batch dict with `task_ids` [rows] int32 (before packing: packed rows keep one task).
    """
    parts = []
    for k, (train, batch) in enumerate(zip(trains, batches)):
        if batch is None and plan is not None:
            continue
        if batch is None:
            batch = _empty_batch(train)
        if plan is None:
            batch = pipeline.pad_batch(batch, batch_size)
        rows = len(batch["input_ids"])
        parts.append({**widen_targets(batch, target_width),
                      TASK_IDS: np.full(rows, k, np.int32)})
    joint = _concat(parts)
    return plan.pack(joint) if plan is not None else joint


def joint_train_batches(trains: Sequence[pipeline.EncodedData], total_steps: Sequence[int],
                        batch_size: int, *, seed: int, target_width: int,
                        positions: Sequence[pipeline.DataState] | None = None,
                        start_step: int = 0, plan: packing_lib.PackingPlan | None = None
                        ) -> Iterator[tuple[list[pipeline.DataState], dict[str, np.ndarray]]]:
    """(each task's data position after, the global joint batch) of steps start_step+1, ...

    Task k draws from `pipeline.train_batches(trains[k], batch_size, seed=seed,
    state=positions[k])` up to its step `total_steps[k]`; a resumed run passes the positions
    its checkpoint recorded."""
    positions = list(positions or [pipeline.DataState() for _ in trains])
    streams = [pipeline.train_batches(t, batch_size, seed=seed, state=p)
               for t, p in zip(trains, positions)]
    step = start_step
    while True:
        step += 1
        batches: list[dict | None] = []
        for k, total in enumerate(total_steps):
            batch = None
            if step <= total:
                batch, positions[k] = next(streams[k])
            batches.append(batch)
        yield list(positions), joint_batch(trains, batches, batch_size, target_width, plan)


def joint_packing_plan(trains: Sequence[pipeline.EncodedData], total_steps: Sequence[int],
                       batch_size: int, *, seed: int,
                       task_plans: Sequence[packing_lib.PackingPlan], multiple_of: int = 1,
                       max_buckets: int = 4) -> packing_lib.PackingPlan:
    """Packed shapes for every joint batch of a run.

    Widths: the widest of the tasks' own plans; row buckets: `fit_row_buckets` over the rows
    every joint batch of the run packs into (one task per row); target buckets: each task's
    short targets. A pure function of the data, so a resumed run computes the same plan.

    Args:
      trains / total_steps / batch_size / seed: as `joint_train_batches`.
      task_plans: each task's single-task plan (`plan_packing`).
      multiple_of: the devices the rows are split over.
      max_buckets: at most this many row counts (one compiled train step each).
    """
    source_length = max(p.max_source_length for p in task_plans)
    target_length = max(p.packed_target_length for p in task_plans)
    lengths = []  # per task: (source, target) lengths of each of its batches, in order
    for train, total in zip(trains, total_steps):
        stream = pipeline.train_batches(train, batch_size, seed=seed)
        lengths.append([(b["attention_mask"].sum(1), b["decoder_attention_mask"].sum(1))
                        for b, _ in (next(stream) for _ in range(total))])
    counts = []
    for step in range(max(total_steps)):
        active = [(k, lengths[k][step]) for k, total in enumerate(total_steps) if step < total]
        layout = packing_lib.assign_rows(
            np.concatenate([s for _, (s, _) in active]),
            np.concatenate([t for _, (_, t) in active]),
            max_source_length=source_length, packed_target_length=target_length,
            groups=np.concatenate([np.full(len(s), k) for k, (s, _) in active]))
        counts.append(layout.num_rows)
    buckets = packing_lib.fit_row_buckets(counts, max_buckets=max_buckets,
                                          multiple_of=multiple_of)
    tight = sorted({t for p in task_plans for t in p.target_buckets})
    targets = packing_lib.fit_row_buckets(tight) if tight else ()
    return packing_lib.PackingPlan(source_length, target_length, buckets, targets)
