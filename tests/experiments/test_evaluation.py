"""experiments.evaluation: per-example predictions are written whole or not at all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compacter_jax import data as data_lib
from experiments.evaluation import Evaluator


def evaluator(tmp_path):
    task = data_lib.get_task("stsb")
    empty = np.zeros((2, 1), np.int32)
    encoded = data_lib.EncodedData(task, empty, empty, empty, empty, references=(3.8, 1.0),
                                   groups=(None, None), num_truncated_source=0,
                                   num_truncated_target=0, sources=("s1", "s2"),
                                   targets=("3.8", "1.0"), rows=(4, 9))
    return Evaluator(task, tokenizer=None, model=None, encoded={"validation": encoded},
                     batch_size=2, max_new_tokens=4, predictions_dir=tmp_path / "predictions")


def test_predictions_are_replaced_whole(tmp_path, monkeypatch):
    ev = evaluator(tmp_path)
    path = ev.write_predictions("validation", ["3.8", "abc"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["index"], r["source"], r["prediction"], r["reference"]) for r in rows] == [
        (4, "s1", "3.8", 3.8), (9, "s2", "abc", 1.0)]
    before = path.read_text()

    def disk_fails(*_):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("os.fsync", disk_fails)
    with pytest.raises(OSError, match="injected"):
        ev.write_predictions("validation", ["1.0", "2.0"])
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == ["validation.jsonl"]
