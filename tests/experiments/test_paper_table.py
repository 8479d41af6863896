"""`experiments.paper_table`: Table 1 and the low-resource figure from real (tiny) runs; the
selection, averaging and reading rules on their own.

The real runs: a random t5-tiny fine-tuned 4 steps on RTE (the shared files), Compacter++ in
two configurations (learning rates), BitFit in one, and one low-resource Compacter++ run.
Evaluation ranks the label strings, so validation scores differ between configurations even on
a random backbone. Compiles are shared through JAX's persistent compilation cache.
"""

from __future__ import annotations

import csv
import json

import jax
import numpy as np
import pytest

from experiments import finetune, paper, paper_table
from experiments.configs.glue import get_config
from experiments.paper_table import Row
from experiments.run_results import RunResult


def tiny_config(method, learning_rate, train_samples=-1):
    c = get_config()
    c.task, c.method, c.model, c.fallback_model = "rte", method, "random:t5-tiny", ""
    if method == "compacter++":
        c.peft.reduction_factor = 8  # t5-tiny: d_model 64 -> bottleneck 8, divisible by n = 4
    c.learning_rate, c.train_samples = learning_rate, train_samples
    c.max_source_length, c.batch_size, c.eval_batch_size, c.max_eval_samples = 32, 8, 16, 16
    c.warmup_steps, c.max_steps, c.eval_every, c.log_every = 1, 4, 2, 2
    c.num_devices, c.eval_mode, c.packing = 1, "rank", False  # one padded shape: shared compiles
    return c


RUNS = {  # workdir below the runs root -> (method, learning rate, train_samples)
    "rte/compacter++/rf8_n4_lr1e-2": ("compacter++", 1e-2, -1),
    "rte/compacter++/rf8_n4_lr3e-3": ("compacter++", 3e-3, -1),
    "rte/bitfit/lr1e-2": ("bitfit", 1e-2, -1),
    "rte/compacter++/rf8_n4_lr1e-2_train16": ("compacter++", 1e-2, 16),
}


@pytest.fixture(scope="module")
def tables(shared_data, t5_vocab, tmp_path_factory):
    """The four runs, and paper_table's output on their directory."""
    # Compile time dominates these runs: identical programs compile once (persistent cache)
    # and XLA skips most optimisations (halves the compiles; the tables do not care).
    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla")),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_disable_most_optimizations": True}
    old = {k: jax.config.values[k] for k in settings}
    try:
        for k, v in settings.items():
            jax.config.update(k, v)
        root = tmp_path_factory.mktemp("runs")
        summaries = {name: finetune.train_and_evaluate(tiny_config(*spec), root / name)
                     for name, spec in RUNS.items()}
    finally:
        for k, v in old.items():
            jax.config.update(k, v)
    out = tmp_path_factory.mktemp("tables")
    assert paper_table.main([str(root), "--out", str(out)]) == 0
    return summaries, root, out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_row(text, title):
    """The cells of the first markdown table row whose method cell is `title`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == title:
            return cells
    raise AssertionError(f"no row {title!r} in\n{text}")


@pytest.mark.slow
def test_table1_holds_the_best_validation_configuration(tables):
    summaries, root, out = tables
    candidates = sorted(n for n in RUNS if n.startswith("rte/compacter++/") and "train" not in n)
    best_val = max(summaries[n]["best_validation_score"] for n in candidates)
    chosen = next(n for n in candidates if summaries[n]["best_validation_score"] == best_val)
    rte = summaries[chosen]["test"]["accuracy"]

    md = (out / "table1.md").read_text()
    cells = md_row(md, "Compacter++")  # our row comes before the paper's
    columns = ["method", "%", *paper.GLUE_TASKS, "avg", "task avg"]
    assert dict(zip(columns, cells))["rte"] == f"{rte:.2f}"
    assert all(dict(zip(columns, cells))[t] == "" for t in paper.GLUE_TASKS if t != "rte")
    assert dict(zip(columns, cells))["avg"] == f"{rte:.2f} (1/8)"  # marked incomplete

    rows = {(r["source"], r["method"]): r for r in read_csv(out / "table1.csv")}
    ours = rows[("ours", "compacter++")]
    assert float(ours["rte"]) == pytest.approx(rte, abs=1e-4)
    assert ours["cola"] == "" and ours["mrpc.f1"] == ""  # blanks, never zeros
    assert (ours["tasks_present"], ours["tasks_total"]) == ("1", "8")
    assert rows[("ours", "bitfit")]["rte"] != ""

    chosen_rows = {r["workdir"]: r["selected"]  # relative to the runs root: tables travel
                   for r in read_csv(out / "selection.csv")}
    assert len(chosen_rows) == len(RUNS)
    assert chosen_rows[chosen] == "True"
    assert [chosen_rows[n] for n in candidates].count("True") == 1


@pytest.mark.slow
def test_percent_trained_is_over_the_backbone(tables):
    summaries, root, out = tables
    bitfit = summaries["rte/bitfit/lr1e-2"]
    # BitFit trains only biases it inserted, so its total minus its trainables is the backbone.
    backbone = bitfit["total_params"] - bitfit["trainable_params"]
    rows = {(r["source"], r["method"]): r for r in read_csv(out / "table1.csv")}
    for name, method in (("rte/bitfit/lr1e-2", "bitfit"),
                         ("rte/compacter++/rf8_n4_lr1e-2", "compacter++")):
        expected = 100 * summaries[name]["trainable_params"] / backbone
        assert float(rows[("ours", method)]["percent_trained_min"]) == pytest.approx(expected)


@pytest.mark.slow
def test_paper_reference_row_and_notes(tables):
    _, _, out = tables
    md = (out / "table1.md").read_text()
    paper_part = md.split("The paper (T5-base), as reported:")[1]
    cells = md_row(paper_part, "Compacter++")
    assert cells[1] == "0.047" and cells[4] == "90.69/93.33" and cells[-2] == "86.47"
    assert md_row(paper_part, "Adapter")[-2] == "85.78"
    assert "Random backbone" in md and "max_steps=4" in md


@pytest.mark.slow
def test_low_resource_figure_and_csv(tables):
    summaries, root, out = tables
    png = (out / "low_resource.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    points = read_csv(out / "low_resource.csv")
    assert [(p["method"], p["train_samples"]) for p in points] == [("compacter++", "16")]
    for p in points:
        s = summaries[f"rte/compacter++/rf8_n4_lr1e-2_train{p['train_samples']}"]
        assert s["train_examples"] == int(p["train_samples"])
        assert float(p["test_score"]) == pytest.approx(s["test"]["score"])


# ------------------------------------------------------------------ the rules on their own


def test_full_fine_tuning_is_named_after_its_backbone():
    # "T5-base (full)" is the paper's row: other backbones' full fine-tuning says which it was.
    assert paper_table.method_title("full", ["t5-base"]) == "T5-base (full)"
    assert paper_table.method_title("full", ["google-t5/t5-base"]) == "T5-base (full)"
    assert (paper_table.method_title("full", ["/x/checkpoints/t5-mini-glue/"])
            == "Full fine-tuning (t5-mini-glue)")
    assert (paper_table.method_title("full", ["/r/random-backbone", "t5-base"])
            == "Full fine-tuning (random-backbone, t5-base)")
    assert paper_table.method_title("compacter++", ["/x/t5-mini-glue"]) == "Compacter++"
    mini = RunResult(workdir=paper_table.Path("/runs/rte/full/lr3e-4"), task="rte",
                     method="full", model="/x/t5-mini-glue", config="lr3e-4",
                     train_samples=None, validation_score=50.0, test={"accuracy": 60.0},
                     trainable_params=1, total_params=2, run_config={})
    row = paper_table.measured_rows({("full", "rte", None): mini}, ["rte"])[0]
    md = paper_table.markdown_table([row], ["rte"])
    # % trained (1 of 2 parameters: the backbone's size is unknown), RTE
    assert md_row(md, "Full fine-tuning (t5-mini-glue)")[1:3] == ["50.000", "60.00"]


def test_averages_are_over_values_and_over_task_scores():
    row = Row("compacter", "ours", {"cola": {"matthews_correlation": 60.0},
                                    "mrpc": {"accuracy": 80.0, "f1": 90.0}}, None)
    avg, task_avg, present = paper_table.row_averages(row, paper.GLUE_TASKS)
    assert avg == pytest.approx((60 + 80 + 90) / 3)           # the paper's Avg
    assert task_avg == pytest.approx((60 + (80 + 90) / 2) / 2)  # mean of task scores
    assert present == 2
    # The paper's Compacter++ row: its 11 values average to the paper's 86.47.
    (compacter_pp,) = paper_table.paper_rows(["compacter++"])
    values = [61.27, 93.81, 90.69, 93.33, 90.17, 86.93, 90.46, 90.93, 85.71, 93.08, 74.82]
    assert paper_table.row_averages(compacter_pp, paper.GLUE_TASKS)[0] == pytest.approx(
        np.mean(values))
    assert round(np.mean(values), 2) == 86.47


def test_mixed_backbones_are_named(tmp_path, capsys):
    for name, model in (("a", "t5-base"), ("b", "random:t5-small")):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "summary.json").write_text(json.dumps(
            {"task": "rte", "method": "bitfit", "model": model, "trainable_params": 1,
             "total_params": 2, "best_validation_score": 1.0, "learning_rate": 3e-4}))
    assert paper_table.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "several backbones (random:t5-small, t5-base)" in capsys.readouterr().err
    assert paper_table.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_a_torn_summary_is_left_out_with_a_warning_not_the_whole_table(tmp_path, capsys):
    """One torn summary.json (a run killed while writing, a foreign file) leaves its run out,
    named, and shows it as missing; the other runs still make the table."""
    def summary(task, score):
        return {"task": task, "method": "bitfit", "model": "t5-base", "trainable_params": 1,
                "total_params": 2, "best_validation_score": score, "learning_rate": 3e-4,
                "test": {"accuracy": score}}

    for task in ("rte", "sst2"):
        (tmp_path / task).mkdir()
        (tmp_path / task / "summary.json").write_text(json.dumps(summary(task, 70.0)))
    (tmp_path / "sst2" / "summary.json").write_text('{"task": "sst2", "meth')  # torn
    (tmp_path / "qnli").mkdir()
    (tmp_path / "qnli" / "summary.json").write_bytes(b"\xff\xfe[1]")  # not UTF-8
    (tmp_path / "wnli").mkdir()
    (tmp_path / "wnli" / "summary.json").write_text("[1, 2]")  # not an object
    out = tmp_path / "out"
    assert paper_table.main([str(tmp_path), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for name in ("sst2", "qnli", "wnli"):
        assert f"warning: left out (shown as missing): {tmp_path / name / 'summary.json'}" in err
    md = (out / "table1.md").read_text()
    cells = dict(zip(["method", "%", *paper.GLUE_TASKS, "avg", "task avg"],
                     md_row(md, "BitFit")))
    assert cells["rte"] == "70.00" and cells["sst2"] == "" and cells["avg"] == "70.00 (1/8)"
    assert f"Left out (unreadable summary.json; their runs show as missing): {tmp_path}" in md
    # --out naming a file is refused before anything is read or written.
    assert paper_table.main([str(tmp_path), "--out", str(tmp_path / "rte" / "summary.json")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_a_failed_table_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "selection.csv"
    paper_table.write_csv(out, [{"method": "bitfit", "test_score": 1.5}])
    before = out.read_text()
    assert read_csv(out) == [{"method": "bitfit", "test_score": "1.5"}]

    def disk_fails(*_):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("os.fsync", disk_fails)
    with pytest.raises(OSError, match="injected"):
        paper_table.write_csv(out, [{"method": "lora", "test_score": 2.5}])
    assert out.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["selection.csv"]

