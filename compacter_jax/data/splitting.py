"""The paper's train / validation / test splits (paper §4.1, docs/tasks.md), row for row as the
original code.

The original (`seq2seq/data/tasks.py`, `AbstractTask.get` with `split_validation_test=True`,
as in all its configs) permutes with `torch.randperm(n, generator=manual_seed(data_seed))`;
`torch_randperm` reproduces that permutation exactly, so these are the original's rows.
`data_seed` is the original's `--data_seed` (default 42), separate from the training seed: the
test set must not move when only the training seed changes.

* small tasks (`Task.is_small`: CoLA, MRPC, STS-B, RTE, WNLI and the SuperGLUE sets but
  ReCoRD): train = official train; the official validation set is permuted and split at
  n // 2: first part -> validation, rest -> test.
* large tasks (SST-2, QQP, QNLI, ReCoRD): the official train set is permuted; its first 1,000
  rows become validation, the rest train (in permuted order); official validation = test.
* MNLI: train; validation = validation_mismatched; test = validation_matched.
  (MultiRC is halved by answer rows as in the original, so one question's answers can land in
  both halves; EM then groups within each half.)
* `train_samples` (the original's `max_train_samples`; low-resource study 100 ... 4000): small
  tasks and MNLI keep the first n rows of a fresh permutation of the official train set; large
  tasks the first n rows of their permuted train part (what is left after the 1,000). More
  than available keeps all, with a warning.
* `max_validation_samples` / `max_test_samples` (the original's `max_val_samples` /
  `max_test_samples`): see `limit_eval_rows`.

Row order. Indices count rows in the order of the GLUE TSV / SuperGLUE JSONL files, which is
the order of Hugging Face `datasets` (its glue / super_glue builders read those files top to
bottom; its MRPC train/validation are msr_paraphrase_train.txt filtered by dev_ids, in file
order, as GLUE's train.tsv/dev.tsv are; there HF's `idx` is the row of that combined file, so
its values, not its order, differ from ours). `FilesSource` numbers rows in file order
(MultiRC: paragraph, question, answer as nested in the file; ReCoRD: one row per query), so
it gives the original's rows. TFDS stores examples in hashed order; `TfdsSource` sorts them by
`idx`, which for GLUE is the row number in the file (MRPC: as HF), so GLUE comes out in file
order too. For SuperGLUE the TFDS `idx` is the file's own `idx` field (a dict for MultiRC /
ReCoRD, compared in the alphabetical order of its keys, e.g. answer before paragraph), which
gives file order only where those ids increase along the file.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from compacter_jax.data.randperm import torch_randperm
from compacter_jax.data.sources import Source
from compacter_jax.data.tasks import Example, Task, get_task

LARGE_VALIDATION_SIZE = 1000
PAPER_SPLITS = ("train", "validation", "test")
EVAL_SPLITS = ("validation", "test")

log = logging.getLogger(__name__)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def split_indices(task: Task | str, num_train: int, num_validation: int, *, data_seed: int = 42,
                  train_samples: int | None = None) -> dict[str, tuple[str, np.ndarray | None]]:
    """Which official split and which rows of it make each paper split (pure, no data needed).

    Args:
      task: a `Task` or its registry name.
      num_train / num_validation: sizes of the official train / validation split (for MNLI the
        validation size is unused: both MNLI validation sets are taken whole).
      data_seed: the original's `data_seed` (default 42), seeding every permutation.
      train_samples: keep this many training rows (see the module doc), or all (None).

    Returns:
      {"train" | "validation" | "test": (official split name, int64 row indices into it, or
      None for "the whole split", MNLI's validation and test)}.
    """
    task = get_task(task)
    _check_positive("train_samples", train_samples)
    all_rows = lambda n: np.arange(n, dtype=np.int64)  # noqa: E731
    if task.test_split is not None:  # MNLI: fixed validation / test
        train = all_rows(num_train)
        out = {"validation": (task.validation_split, None), "test": (task.test_split, None)}
    elif task.is_small:
        perm = torch_randperm(num_validation, data_seed)
        half = num_validation // 2
        train = all_rows(num_train)
        out = {"validation": ("validation", perm[:half]), "test": ("validation", perm[half:])}
    else:
        if num_train <= LARGE_VALIDATION_SIZE:
            raise ValueError(f"{task.name}: {num_train} training examples; need more than "
                             f"{LARGE_VALIDATION_SIZE} to hold out a validation set")
        perm = torch_randperm(num_train, data_seed)
        train = perm[LARGE_VALIDATION_SIZE:]
        out = {"validation": ("train", perm[:LARGE_VALIDATION_SIZE]),
               "test": ("validation", all_rows(num_validation))}
    if train_samples is not None:
        if train_samples > len(train):
            log.warning("%s: train_samples=%d exceeds the %d training examples; using all",
                        task.name, train_samples, len(train))
        # As the original `subsample`: large tasks cut their already permuted train part;
        # the others draw a fresh permutation of the official train set.
        if task.is_small or task.test_split is not None:
            train = torch_randperm(num_train, data_seed)
        train = train[:train_samples]
    out["train"] = ("train", train)
    return {k: out[k] for k in PAPER_SPLITS}


def limit_eval_rows(task: Task | str, split: str, rows: np.ndarray | None, num_official: int,
                    max_samples: int | None, *, data_seed: int = 42) -> np.ndarray | None:
    """The original's `max_val_samples` / `max_test_samples` cut of one evaluation split.

    Where the paper split is part of a seeded permutation (small tasks' halves, large tasks'
    1,000-row validation) its first `max_samples` rows are kept; where it is a whole official
    split (large tasks' test, MNLI's validation and test) the first `max_samples` rows of a
    fresh `data_seed` permutation of that split are kept (as `AbstractTask.subsample`).

    Args:
      task: a `Task` or its registry name.
      split: "validation" or "test" (the paper split).
      rows: that split's rows from `split_indices` (None = the whole official split).
      num_official: size of the official split `rows` index into.
      max_samples: keep at most this many rows; None keeps `rows` as they are.
      data_seed: the seed given to `split_indices`.

    Returns:
      int64 row indices into the official split (or `rows` itself when max_samples is None).
    """
    task = get_task(task)
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    _check_positive(f"max_{split}_samples", max_samples)
    if max_samples is None:
        return rows
    if max_samples > num_official:  # the original compares with the official split's size
        log.warning("%s: max_%s_samples=%d exceeds the %d examples of the official split; "
                    "using all", task.name, split, max_samples, num_official)
    permuted_part = task.test_split is None and (task.is_small or split == "validation")
    if permuted_part:
        if rows is None:
            raise ValueError(f"{task.name} {split}: rows from split_indices are needed")
        return np.asarray(rows, dtype=np.int64)[:max_samples]
    return torch_randperm(num_official, data_seed)[:max_samples]


@dataclasses.dataclass(frozen=True)
class PaperSplit:
    """One paper split: its examples and where each came from.

    Attributes:
      official: the official split the rows are taken from ("train", "validation", ...).
      rows: int64 [n], each example's row in that split's file (0-based over data rows).
      examples: the examples, in that order.
    """

    official: str
    rows: np.ndarray
    examples: list[Example]


def load_paper_splits(task: Task | str, source: Source, *, data_seed: int = 42,
                      train_samples: int | None = None,
                      max_validation_samples: int | None = None,
                      max_test_samples: int | None = None) -> dict[str, PaperSplit]:
    """{"train", "validation", "test"} -> `PaperSplit`, read from `source` (see the module doc).

    Args:
      task: a `Task` or its registry name.
      source: where official splits are loaded from (`FilesSource`, `TfdsSource`).
      data_seed / train_samples: as `split_indices`.
      max_validation_samples / max_test_samples: as `limit_eval_rows` (None: no limit).
    """
    task = get_task(task)
    train = source.load(task, "train")
    official_val = task.validation_split if task.test_split is None else None
    validation = source.load(task, official_val) if official_val else []
    plan = split_indices(task, len(train), len(validation), data_seed=data_seed,
                         train_samples=train_samples)
    limits = {"validation": max_validation_samples, "test": max_test_samples}
    loaded = {"train": train, "validation": validation}
    out: dict[str, PaperSplit] = {}
    for split, (official, rows) in plan.items():
        if official not in loaded:
            loaded[official] = source.load(task, official)
        data = loaded[official]
        if split in limits:
            rows = limit_eval_rows(task, split, rows, len(data), limits[split],
                                   data_seed=data_seed)
        rows = np.arange(len(data), dtype=np.int64) if rows is None else np.asarray(rows)
        out[split] = PaperSplit(official, rows, [data[i] for i in rows])
    return out


def paper_splits(task: Task | str, source: Source, **kwargs) -> dict[str, list[Example]]:
    """{"train", "validation", "test"} -> examples, in the order of the (permuted) row indices
    (`load_paper_splits` with the rows dropped; same keyword arguments)."""
    return {k: v.examples for k, v in load_paper_splits(task, source, **kwargs).items()}


splits = paper_splits
