"""experiments.run_results: reading finished runs and the original's selection rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments import run_results
from experiments.run_results import RunResult


def result(method="compacter", task="rte", config="rf32_n4_lr3e-3", validation=50.0,
           test=None, train_samples=None):
    return RunResult(workdir=Path(f"/runs/{task}/{method}/{config}"), task=task, method=method,
                     model="t5-base", config=config, train_samples=train_samples,
                     validation_score=validation, test=test or {"accuracy": 60.0},
                     trainable_params=1, total_params=2, run_config={})


def test_select_best_takes_the_highest_validation_per_method_task_and_size():
    runs = [result(config="rf32_n4_lr3e-3", validation=70.0),
            result(config="rf16_n4_lr3e-3", validation=72.5),
            result(config="rf8_n4_lr3e-3", validation=None),       # never evaluated
            result(config="rf8_n8_lr3e-3", validation=72.5),       # a tie: the first name wins
            result(config="rf32_n4_lr3e-3", validation=10.0, train_samples=100),
            result(method="bitfit", config="lr3e-4", validation=1.0)]
    best = run_results.select_best(runs)
    assert set(best) == {("compacter", "rte", None), ("compacter", "rte", 100),
                         ("bitfit", "rte", None)}
    assert best[("compacter", "rte", None)].config == "rf16_n4_lr3e-3"
    assert best[("compacter", "rte", 100)].validation_score == 10.0


def test_bad_summaries_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"a/summary.json: not a readable summary"):
        run_results.find_runs(tmp_path)
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"task": "rte"}))
    with pytest.raises(ValueError, match=r"missing \['method', 'model'"):
        run_results.find_runs(tmp_path)


def test_task_score_needs_every_metric():
    assert run_results.task_score("mrpc", {"accuracy": 80.0}) is None
    assert run_results.task_score("mrpc", {"accuracy": 80.0, "f1": 90.0}) == 85.0
    assert math.isclose(run_results.task_score("stsb", {"pearson": 1.0, "spearmanr": 2.0}), 1.5)


def test_runs_behind_linked_folders_are_found_once_and_a_link_loop_ends(tmp_path):
    def summary(folder, method):
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({
            "task": "rte", "method": method, "model": "m", "trainable_params": 1,
            "total_params": 2, "best_validation_score": 50.0, "test": {"accuracy": 50.0}}))
    summary(tmp_path / "grid" / "rte" / "full", "full")
    summary(tmp_path / "elsewhere" / "rte" / "lora", "lora")  # e.g. another disk
    (tmp_path / "grid" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "grid" / "rte" / "loop").symlink_to(tmp_path / "grid", target_is_directory=True)
    runs, unreadable = run_results.read_runs(tmp_path / "grid")
    assert not unreadable
    assert sorted(r.method for r in runs) == ["full", "lora"]
    assert [r.method for r in run_results.find_runs(tmp_path / "grid")] == ["lora", "full"]
