"""experiments.by_length: scores by input length from a run's saved predictions."""

import json

import numpy as np
import pytest

from experiments import by_length


def _row(words: int, prediction: str, reference: int) -> dict:
    text = " ".join(["word"] * words)
    return {"source": f"sst2 sentence: {text} ", "prediction": prediction,
            "reference": reference}


def _write_run(path, rows, task="sst2"):
    (path / "predictions").mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({  # the fields experiments.glue writes
        "task": task, "method": "compacter++", "model": "t5-mini-glue",
        "trainable_params": 1, "total_params": 2}))
    (path / "predictions" / "validation.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_words_leaves_out_the_task_prefix_and_field_names():
    assert by_length.text_words("sst2 sentence: a fine film . ", "sst2") == 4
    assert by_length.text_words("sentence1: a b sentence2: c", "rte") == 3
    # The prefix is the original's task name, not always the registry's.
    assert by_length.text_words("superglue-cb premise: it rains hypothesis: wet", "cb") == 3
    # The task's name inside the text is a word of the text.
    assert by_length.text_words("sentence: sst2 is a task", "sst2") == 4


def test_bucket_scores_are_each_buckets_accuracy():
    rows = ([_row(2, "1", 1)] * 3 + [_row(4, "0", 1)]          # [0, 5): 3 of 4 right
            + [_row(5, "0", 0), _row(9, "1", 0)]               # [5, 10): 1 of 2
            + [_row(30, "1", 1)] * 5)                          # [20, inf): 5 of 5
    scores = by_length.bucket_scores(rows, "sst2", [5, 10, 20])
    assert list(scores) == ["[0, 5)", "[5, 10)", "[10, 20)", "[20, inf)", "all"]
    assert [s["rows"] for s in scores.values()] == [4, 2, 0, 5, 11]
    assert scores["[0, 5)"]["score"] == pytest.approx(75.0)
    assert scores["[5, 10)"]["score"] == pytest.approx(50.0)
    assert scores["[10, 20)"]["score"] is None                  # empty, not 0
    assert scores["[20, inf)"]["score"] == pytest.approx(100.0)
    assert scores["all"]["score"] == pytest.approx(100 * 9 / 11)


def test_compare_averages_the_runs_named_together(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=200)
    refs = rng.integers(0, 2, size=200)
    accuracies = {}
    named = []
    for seed in range(3):
        right = rng.random(200) < 0.5 + 0.1 * seed
        preds = np.where(right, refs, 1 - refs)
        _write_run(tmp_path / f"s{seed}", [_row(int(n), str(int(p)), int(r))
                                           for n, p, r in zip(lengths, preds, refs)])
        named.append(tmp_path / f"s{seed}")
        long = lengths >= 10
        accuracies.setdefault("short", []).append(100 * np.mean(preds[~long] == refs[~long]))
        accuracies.setdefault("long", []).append(100 * np.mean(preds[long] == refs[long]))
    result = by_length.compare({"m": named}, "validation", [10])["m"]
    # float64 means and sds of percentages (<= 100): rounding is ~1e-13, far below 1e-9.
    for bucket, key in (("[0, 10)", "short"), ("[10, inf)", "long")):
        assert result[bucket]["score"] == pytest.approx(np.mean(accuracies[key]), abs=1e-9)
        assert result[bucket]["sd"] == pytest.approx(np.std(accuracies[key], ddof=1), abs=1e-9)
        assert result[bucket]["runs"] == 3
    assert result["[0, 10)"]["rows"] == int(np.sum(lengths < 10))
    assert "± " in by_length.markdown({"m": result})


def test_cli_writes_json_and_names_bad_input(tmp_path, capsys):
    run = _write_run(tmp_path / "run", [_row(3, "1", 1), _row(12, "0", 1)])
    out = tmp_path / "by_length.json"
    assert by_length.main([f"one={run}", "--edges", "10", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| one | 100.0 (1) | 0.0 (1) | 50.0 (2) |" in table
    assert json.loads(out.read_text())["one"]["[10, inf)"]["score"] == 0.0

    assert by_length.main([str(run)]) == 2                      # no NAME=
    assert "NAME=RUN" in capsys.readouterr().err
    assert by_length.main([f"x={tmp_path / 'missing'}"]) == 2
    assert "summary.json not found" in capsys.readouterr().err
    assert by_length.main([f"one={run}", "--edges", "10,5"]) == 2
    assert "increasing" in capsys.readouterr().err


def test_runs_of_different_tasks_are_not_averaged(tmp_path):
    a = _write_run(tmp_path / "a", [_row(3, "1", 1)])
    b = _write_run(tmp_path / "b", [_row(3, "1", 1)], task="cola")
    with pytest.raises(ValueError, match="different tasks"):
        by_length.compare({"mixed": [a, b]}, "validation", [5])
