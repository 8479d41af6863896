"""`experiments.paper_dp` through `experiments.paper_table`: a differentially private run is a
row of its own under its method's, titled with the epsilon it spent, and the non-private row is
what it would be without it. The summaries are written here with the keys `experiments.finetune`
writes, the "privacy" record made by `experiments.dp`'s own plan (dp-accounting's epsilon)."""

from __future__ import annotations

import csv
import functools
import json

import pytest

from compacter_jax import peft
from experiments import dp as dp_run
from experiments import paper_table
from experiments.configs.glue import get_config

N_TRAIN, STEPS = 2_000, 40


def write_summary(path, method, lr, validation, accuracy, dp_epsilon=None, train_samples=-1):
    """A summary.json as `experiments.finetune._finish` writes it (the fields paper_table reads
    and the "privacy" record of `DPPlan.summary`)."""
    config = get_config()
    config.task, config.method, config.model = "rte", method, "random:t5-tiny"
    config.learning_rate, config.batch_size, config.train_samples = lr, 20, train_samples
    config.dp.epsilon = dp_epsilon
    summary = {"task": "rte", "method": method, "model": "random:t5-tiny",
               "trainable_params": 1_000, "total_params": 100_000, "steps": STEPS,
               "best_step": STEPS, "best_validation_score": validation, "learning_rate": lr,
               "train_examples": N_TRAIN, "method_config": peft.get_method(method).to_dict(),
               "config": config.to_dict(), "test": {"accuracy": accuracy}}
    if dp_epsilon is not None:
        summary["privacy"] = privacy_record(dp_epsilon)
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary))
    return summary


@functools.lru_cache(maxsize=None)
def privacy_record(dp_epsilon):
    """`experiments.dp`'s summary record of a run calibrated for `dp_epsilon` (the noise is
    calibrated once per target: the runs of one target share it)."""
    config = get_config()
    config.batch_size, config.dp.epsilon = 20, dp_epsilon
    return dp_run.make_plan(config, N_TRAIN, STEPS, multiple_of=1).summary(STEPS)


def md_rows(text):
    """{first cell: cells} of the rows of `text`'s first markdown table (the measured one)."""
    measured = text.split("The paper (T5-base)")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in measured.splitlines() if line.startswith("| ")]
    return {cells[0]: cells for cells in rows}


def test_a_dp_run_gets_its_own_row_with_the_epsilon_it_spent(tmp_path):
    runs, out, alone = tmp_path / "runs", tmp_path / "out", tmp_path / "alone"
    write_summary(runs / "rte/bitfit/lr3e-4", "bitfit", 3e-4, 60.0, 58.0)
    write_summary(runs / "rte/bitfit/lr1e-3", "bitfit", 1e-3, 55.0, 70.0)  # worse validation
    # The DP runs score higher on validation than every non-private run: selected among
    # themselves, they never stand in for the bitfit row.
    dp3 = write_summary(runs / "rte/bitfit/lr3e-4_dp-eps3", "bitfit", 3e-4, 90.0, 51.0, 3.0)
    write_summary(runs / "rte/bitfit/lr1e-3_dp-eps3", "bitfit", 1e-3, 80.0, 99.0, 3.0)
    dp8 = write_summary(runs / "rte/bitfit/lr3e-4_dp-eps8", "bitfit", 3e-4, 91.0, 53.0, 8.0)
    write_summary(runs / "rte/bitfit/lr3e-4_train100_dp-eps3", "bitfit", 3e-4, 95.0, 50.0,
                  3.0, train_samples=100)
    write_summary(runs / "rte/bitfit/lr3e-4_train100", "bitfit", 3e-4, 40.0, 45.0,
                  train_samples=100)
    assert paper_table.main([str(runs), "--out", str(out)]) == 0
    text = (out / "table1.md").read_text()
    rows = md_rows(text)
    eps3, eps8 = dp3["privacy"]["epsilon"], dp8["privacy"]["epsilon"]
    assert 2.5 < eps3 <= 3.0 and 6.5 < eps8 <= 8.0  # calibrated to the target: spent ~ it
    rte = list(rows["method"]).index("RTE")
    assert rows["BitFit"][rte] == "58.00"  # the non-private choice, untouched by DP runs
    assert rows[f"BitFit (DP, ε={eps3:.3g})"][rte] == "51.00"
    assert rows[f"BitFit (DP, ε={eps8:.3g})"][rte] == "53.00"
    titles = [title for title in rows if title.startswith("BitFit")]  # in the table's order
    assert titles == ["BitFit", f"BitFit (DP, ε={eps3:.3g})", f"BitFit (DP, ε={eps8:.3g})"]
    delta = dp3["privacy"]["delta"]
    assert delta == pytest.approx(1 / N_TRAIN ** 1.1)
    assert f"RTE ε={eps3:.3g}, δ={delta:.2g}" in text
    with open(out / "table1.csv", newline="") as f:
        records = {(r["source"], r.get("dp_target_epsilon", "")): r for r in csv.DictReader(f)}
    assert float(records[("ours (DP)", "3.0")]["dp_epsilon_max"]) == pytest.approx(eps3)
    assert float(records[("ours (DP)", "3.0")]["dp_delta_max"]) == pytest.approx(delta)
    assert float(records[("ours", "")]["rte"]) == 58.0
    # The low-resource points leave the DP run out unless asked.
    with open(out / "low_resource.csv", newline="") as f:
        assert [r["workdir"].split("/")[-1] for r in csv.DictReader(f)] == ["lr3e-4_train100"]
    assert paper_table.main([str(runs), "--out", str(tmp_path / "dp"), "--low-resource-dp"]) == 0
    with open(tmp_path / "dp" / "low_resource.csv", newline="") as f:
        points = {r["workdir"].split("/")[-1]: r["dp_epsilon"] for r in csv.DictReader(f)}
    assert points.keys() == {"lr3e-4_train100", "lr3e-4_train100_dp-eps3"}
    assert points["lr3e-4_train100"] == ""
    assert float(points["lr3e-4_train100_dp-eps3"]) == pytest.approx(eps3)
    # Without the DP runs, the non-private rows are the same.
    for name in ("lr3e-4", "lr1e-3", "lr3e-4_train100"):
        write_summary(alone / "rte/bitfit" / name, "bitfit", *{
            "lr3e-4": (3e-4, 60.0, 58.0), "lr1e-3": (1e-3, 55.0, 70.0)}.get(
                name, (3e-4, 40.0, 45.0)), **({"train_samples": 100} if "train" in name else {}))
    assert paper_table.main([str(alone), "--out", str(tmp_path / "alone_out")]) == 0
    assert md_rows((tmp_path / "alone_out" / "table1.md").read_text())["BitFit"] == rows["BitFit"]


def test_a_torn_privacy_record_leaves_the_run_out_named(tmp_path, capsys):
    write_summary(tmp_path / "rte/bitfit/lr3e-4", "bitfit", 3e-4, 60.0, 58.0)
    torn = tmp_path / "rte/bitfit/lr3e-4_dp-eps3/summary.json"
    torn.parent.mkdir(parents=True)
    summary = json.loads((tmp_path / "rte/bitfit/lr3e-4/summary.json").read_text())
    torn.write_text(json.dumps({**summary, "privacy": {"delta": 1e-5}}))
    assert paper_table.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"{torn}: not a readable summary.json" in err and "'epsilon'" in err
    assert "(DP" not in (tmp_path / "out" / "table1.md").read_text()
