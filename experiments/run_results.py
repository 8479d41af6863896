"""What finished runs say: every `summary.json` below a folder (`experiments.finetune` writes
one per run), read into a `RunResult`, and the original's selection rule (per method, task and
training-set size, the best validation score; the test score is reported, never selected on).

    runs, unreadable = run_results.read_runs(Path("runs/paper"))
    best = run_results.select_best(runs)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import peft
from experiments import paper, paper_dp

SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One finished run, as its summary.json tells.

    Attributes:
      workdir: the run's directory.
      task / method / model: registry names and the backbone the run used.
      config: the configuration's name ("rf32_n4_lr3e-3"), as `paper_runs` names workdirs.
      train_samples: the low-resource size, or None for the whole training set.
      validation_score: the best validation score (selection key); None if never evaluated.
      test: test metrics (0-100) at the best validation checkpoint; {} if not evaluated.
      trainable_params / total_params: parameter counts.
      run_config: the full run config (for the recipe check).
      privacy: the "privacy" record of a differentially private run (`experiments.dp`: the
        epsilon and delta spent, the noise, ...); None for a non-private run.
    """

    workdir: Path
    task: str
    method: str
    model: str
    config: str
    train_samples: int | None
    validation_score: float | None
    test: Mapping[str, float]
    trainable_params: int
    total_params: int
    run_config: Mapping[str, Any]
    privacy: Mapping[str, Any] | None = None

    @property
    def test_score(self) -> float | None:
        """The task score: the mean of its metrics (None without test metrics)."""
        return task_score(self.task, self.test)


def load_run(path: Path) -> RunResult:
    """A `RunResult` from one summary.json. Raises ValueError naming the file and the field."""
    try:
        s = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable summary.json ({e})") from None
    if not isinstance(s, dict):
        raise ValueError(f"{path}: not a readable summary.json (a JSON {type(s).__name__}, "
                         "not an object)")
    missing = [k for k in ("task", "method", "model", "trainable_params", "total_params")
               if k not in s]
    if missing:
        raise ValueError(f"{path}: missing {missing}; it was not written by "
                         "experiments.finetune (delete it or re-run that workdir)")
    try:
        return _run_result(Path(path), s)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable summary.json ({e})") from None


def _run_result(path: Path, s: Mapping[str, Any]) -> RunResult:
    run_config = s.get("config", {})
    train_samples = run_config.get("train_samples", -1)
    validation = s.get("best_validation_score")
    if validation is None:
        validation = s.get("validation", {}).get("validation/score")
    return RunResult(
        workdir=path.parent, task=data_lib.get_task(s["task"]).name, method=s["method"],
        model=s["model"], config=_config_name(s), validation_score=validation,
        train_samples=train_samples if train_samples and train_samples > 0 else None,
        test={k: float(v) for k, v in s.get("test", {}).items()},
        trainable_params=int(s["trainable_params"]), total_params=int(s["total_params"]),
        run_config=run_config,
        privacy=paper_dp.check_record(s["privacy"]) if s.get("privacy") else None)


def _config_name(summary: Mapping[str, Any]) -> str:
    """The swept fields and learning rate of a run, named as `paper_runs` names its workdir."""
    lr = summary.get("learning_rate", summary.get("config", {}).get("learning_rate"))
    axes = {}
    try:
        method = peft.method_from_dict(summary["method_config"])
        axes = {k: getattr(method, k) for k in paper.sweep_axes(method)}
    except (KeyError, ValueError, TypeError):  # an older summary or an unknown family
        pass
    dp_epsilon = (summary.get("config", {}).get("dp") or {}).get("epsilon")
    return paper.config_name(axes, lr, dp_epsilon=dp_epsilon) if lr else "preset"


def summary_paths(runs_dir: Path) -> list[Path]:
    """Every summary.json below `runs_dir`, sorted, following linked folders (a grid gathered
    from several disks by symlinks), each real folder once."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(runs_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs.clear()
            continue
        seen.add(real)
        if SUMMARY_FILE in files:
            found.append(Path(folder) / SUMMARY_FILE)
    return sorted(found)


def find_runs(runs_dir: Path) -> list[RunResult]:
    """Every run below `runs_dir` (sorted by path); ValueError at the first unreadable one."""
    return [load_run(p) for p in summary_paths(runs_dir)]


def read_runs(runs_dir: Path) -> tuple[list[RunResult], list[str]]:
    """(every readable run below `runs_dir`, one "PATH: why" per summary.json that is not):
    a torn or foreign file leaves its run out (a blank, as a missing run) but not the rest."""
    runs, unreadable = [], []
    for path in summary_paths(runs_dir):
        try:
            runs.append(load_run(path))
        except ValueError as e:
            unreadable.append(str(e))
    return runs, unreadable


def task_score(task: str, metrics: Mapping[str, float]) -> float | None:
    """The mean of the task's metrics (as the paper's task score), None if any is missing."""
    names = data_lib.get_task(task).metric_names
    if not all(n in metrics for n in names):
        return None
    return float(np.mean([metrics[n] for n in names]))


def select_best(runs: Iterable[RunResult]) -> dict[tuple[str, str, int | None], RunResult]:
    """(method, task, train_samples) -> the run with the best validation score; ties go to
    the configuration whose name sorts first. Runs never evaluated cannot be selected."""
    best: dict[tuple[str, str, int | None], RunResult] = {}
    for run in sorted(runs, key=lambda r: (r.config, str(r.workdir))):
        if run.validation_score is None or not math.isfinite(run.validation_score):
            continue
        key = (run.method, run.task, run.train_samples)
        if key not in best or run.validation_score > best[key].validation_score:
            best[key] = run
    return best
