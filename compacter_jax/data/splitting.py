"""The paper's train / validation / test splits (spec §6, as the original Compacter code).

* small tasks (`Task.is_small`): train = official train; the official validation set is
  permuted (seeded by `data_seed`) and split in half: first n//2 -> validation, rest -> test.
* large tasks (SST-2, QQP, QNLI, ReCoRD): the official train set is permuted; its first 1,000
  examples become validation, the rest train; official validation = test.
* MNLI: train; validation = validation_mismatched; test = validation_matched.
  (MultiRC, a small task, is halved by answer rows as in the original, so one question's
  answers can land in both halves; EM then groups within each half.)
* `train_samples` (low-resource study: 100 ... 4000) keeps the first n examples of a seeded
  permutation of the (remaining) training set; more than available keeps all, with a warning.

The original permutes with `torch.randperm(generator.manual_seed(seed))`; we use numpy's
`default_rng(data_seed).permutation`, so the halves hold the same sizes but not the very same
examples as the PyTorch code. `data_seed` is separate from the training seed on purpose: the
test set must not move when only the training seed changes.
"""

from __future__ import annotations

import logging

import numpy as np

from compacter_jax.data.sources import Source
from compacter_jax.data.tasks import Example, Task, get_task

LARGE_VALIDATION_SIZE = 1000
PAPER_SPLITS = ("train", "validation", "test")

log = logging.getLogger(__name__)


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def split_indices(task: Task | str, num_train: int, num_validation: int, *, data_seed: int = 42,
                  train_samples: int | None = None) -> dict[str, tuple[str, np.ndarray | None]]:
    """Which official split and which rows of it make each paper split (pure, no data needed).

    Args:
      num_train / num_validation: sizes of the official train / validation split (for MNLI the
        validation size is unused: both MNLI validation sets are taken whole).

    Returns:
      {"train" | "validation" | "test": (official split name, int64 row indices, or None for
      "the whole split" — MNLI's validation and test)}.
    """
    task = get_task(task)
    if train_samples is not None and train_samples <= 0:
        raise ValueError(f"train_samples must be positive, got {train_samples}")
    all_rows = lambda n: np.arange(n, dtype=np.int64)  # noqa: E731
    if task.test_split is not None:  # MNLI: fixed validation / test
        train = ("train", all_rows(num_train))
        out = {"validation": (task.validation_split, None), "test": (task.test_split, None)}
    elif task.is_small:
        perm = _permutation(num_validation, data_seed)
        half = num_validation // 2
        train = ("train", all_rows(num_train))
        out = {"validation": ("validation", perm[:half]), "test": ("validation", perm[half:])}
    else:
        if num_train <= LARGE_VALIDATION_SIZE:
            raise ValueError(f"{task.name}: {num_train} training examples; need more than "
                             f"{LARGE_VALIDATION_SIZE} to hold out a validation set")
        perm = _permutation(num_train, data_seed)
        train = ("train", perm[LARGE_VALIDATION_SIZE:])
        out = {"validation": ("train", perm[:LARGE_VALIDATION_SIZE]),
               "test": ("validation", all_rows(num_validation))}
    name, rows = train
    if train_samples is not None:
        if train_samples > len(rows):
            log.warning("%s: train_samples=%d exceeds the %d training examples; using all",
                        task.name, train_samples, len(rows))
        # A fresh seeded permutation for small tasks, the held-out permutation's tail for
        # large ones (both as in the original `subsample`).
        if task.is_small or task.test_split is not None:
            rows = rows[_permutation(len(rows), data_seed)]
        rows = rows[:train_samples]
    out["train"] = (name, rows)
    return {k: out[k] for k in PAPER_SPLITS}


def paper_splits(task: Task | str, source: Source, *, data_seed: int = 42,
                 train_samples: int | None = None) -> dict[str, list[Example]]:
    """{"train", "validation", "test"} -> examples, read from `source` (see module doc)."""
    task = get_task(task)
    train = source.load(task, "train")
    official_val = task.validation_split if task.test_split is None else None
    validation = source.load(task, official_val) if official_val else []
    plan = split_indices(task, len(train), len(validation), data_seed=data_seed,
                         train_samples=train_samples)
    loaded = {"train": train, "validation": validation}
    out: dict[str, list[Example]] = {}
    for split, (official, rows) in plan.items():
        if official not in loaded:
            loaded[official] = source.load(task, official)
        data = loaded[official]
        out[split] = list(data) if rows is None else [data[i] for i in rows]
    return out


splits = paper_splits
