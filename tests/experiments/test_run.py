"""experiments.run, the scaffold under every training CLI: the workdir claim, resume of the
metrics log, the non-finite guard and the summary written atomically, once, by process 0."""

from __future__ import annotations

import json

import ml_collections
import pytest

from compacter_jax import atomic
from experiments import multihost, reporting
from experiments import run as run_lib
from experiments.workdir import WorkdirError, WorkdirLock


def config(**fields):
    return ml_collections.ConfigDict({"task": "rte", "seed": 0, **fields})


def test_a_busy_workdir_is_refused_and_a_free_one_is_locked(tmp_path):
    busy = WorkdirLock(tmp_path).acquire()
    try:
        with pytest.raises(WorkdirError, match="in use by another run"):
            with run_lib.claim_workdir(config(), tmp_path):
                pass
    finally:
        busy.release()
    with run_lib.claim_workdir(config(), tmp_path / "free"):
        with pytest.raises(WorkdirError, match="in use"):
            WorkdirLock(tmp_path / "free").acquire()
        assert json.loads((tmp_path / "free" / "run_config.json").read_text())["config"] == {
            "task": "rte", "seed": 0}
    WorkdirLock(tmp_path / "free").acquire().release()  # released at exit


def test_writers_resume_the_metrics_log_past_a_torn_line(tmp_path):
    writer = reporting.MetricsWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train/lo')  # killed mid-write
    writers = run_lib.open_writers(tmp_path, 2, 10, 8)  # resumed from the step-2 checkpoint
    writers.metrics.write(3, {"train/loss": 30.0})
    writers.close()
    got = [(r["step"], r["train/loss"]) for r in map(json.loads, (
        tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert got == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_the_summary_is_replaced_atomically_or_not_at_all(tmp_path, monkeypatch):
    (tmp_path / "summary.json").write_text('{"old": true}')
    calls = []
    real = reporting.atomic_write
    monkeypatch.setattr(reporting, "atomic_write",
                        lambda path, content: calls.append(path) or real(path, content))
    run_lib.write_summary(tmp_path, {"steps": 3})
    assert calls == [tmp_path / "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3}

    def killed(*args):  # the process dies between writing the new file and the rename
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        run_lib.write_summary(tmp_path, {"steps": 4})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary


def test_only_process_0_writes_the_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(multihost, "is_primary", lambda: False)
    run_lib.write_summary(tmp_path, {"steps": 3})
    assert not list(tmp_path.iterdir())
