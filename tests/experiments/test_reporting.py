"""experiments.reporting: metrics.jsonl survives a kill mid-write and is deduplicated on
resume; summary and plot are replaced atomically; other processes write nothing."""

from __future__ import annotations

import json

import pytest

from experiments import reporting


def lines(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_torn_last_line_is_skipped_and_a_resume_deduplicates(tmp_path, caplog):
    writer = reporting.MetricsWriter(tmp_path)
    for step in (1, 2, 3, 4):
        writer.write(step, {"train/loss": 1.0 / step})
    writer.write(2, {"validation/score": 50.0})
    writer.write(4, {"test/score": 40.0})
    writer.write(3, {"train/loss": 0.3})  # step 3 ran twice (resumed before this fix)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/loss": 0.2, "ti')  # killed mid-write
    with caplog.at_level("WARNING"):
        history = writer.read()
    assert "metrics.jsonl:8: skipping a malformed line" in caplog.text
    assert [(h["step"], sorted(k for k in h if k not in ("step", "time"))) for h in history] == [
        (1, ["train/loss"]), (2, ["train/loss"]), (2, ["validation/score"]),
        (3, ["train/loss"]), (4, ["train/loss"]), (4, ["test/score"])]
    assert next(h for h in history if h["step"] == 3)["train/loss"] == 0.3  # the later one

    # Resumed at step 2: later steps and test records will be recomputed; one record each.
    assert writer.resume_at(2) == 4  # steps 3, 3, 4 and the test record; the torn line too
    assert [(r["step"], next(k for k in r if k not in ("step", "time"))) for r in
            lines(tmp_path)] == [(1, "train/loss"), (2, "train/loss"), (2, "validation/score")]
    writer.write(3, {"train/loss": 0.33})
    assert lines(tmp_path)[-1]["train/loss"] == 0.33
    writer.close()


def test_other_processes_write_nothing(tmp_path):
    writer = reporting.MetricsWriter(tmp_path, enabled=False)
    writer.write(1, {"train/loss": 1.0})
    assert writer.resume_at(0) == 0 and writer.read() == []
    writer.close()
    assert not list(tmp_path.iterdir())


def test_summary_and_plot_replace_atomically(tmp_path):
    summary = {"task": "rte", "method": "compacter++", "model": "random:t5-tiny",
               "trainable_params": 10, "total_params": 100, "steps": 4, "best_step": 2,
               "validation": {"validation/score": 50.0}}
    (tmp_path / "summary.json").write_text("old")
    reporting.write_summary(tmp_path, summary)
    assert json.loads((tmp_path / "summary.json").read_text())["best_step"] == 2
    reporting.plot_curves([{"step": 1, "train/loss": 1.0}, {"step": 2, "validation/score": 5.0}],
                          tmp_path / "learning_curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learning_curves.png", "summary.json"]
    assert (tmp_path / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def _disk_fails(*_, **__):
    raise OSError("disk full (injected)")


def test_a_failed_write_keeps_every_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """A kill mid-write (injected in the flush to disk) leaves summary.json, metrics.jsonl
    and the plot as they were, and no temporary beside them."""
    writer = reporting.MetricsWriter(tmp_path)
    for step in (1, 2):
        writer.write(step, {"train/loss": 1.0 / step})
    writer.close()  # (TensorBoard's writer flushes to disk too)
    before = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "summary.json").write_text("old")
    (tmp_path / "learning_curves.png").write_bytes(b"old")
    monkeypatch.setattr("os.fsync", _disk_fails)
    with pytest.raises(OSError, match="injected"):
        writer.resume_at(1)
    with pytest.raises(OSError, match="injected"):
        reporting.write_summary(tmp_path, {"task": "rte"})
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", _disk_fails)
    with pytest.raises(OSError, match="injected"):
        reporting.plot_curves([{"step": 1, "train/loss": 1.0}], tmp_path / "learning_curves.png")
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "summary.json").read_text() == "old"
    assert (tmp_path / "learning_curves.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learning_curves.png", "metrics.jsonl",
                                                         "summary.json", "tensorboard"]
