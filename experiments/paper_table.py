"""The paper's Table 1 (GLUE), Table 2 (SuperGLUE) and low-resource figure from finished runs.

    python -m experiments.paper_table runs/paper --out results/paper [--model t5-base]

Reads every `summary.json` below RUNS_DIR (`experiments.finetune` writes one per run), and per
(method, task) keeps the configuration with the best validation score (the original selects
on validation and reports test). Writes into --out:

* `table1.md`, `table1.csv`: rows = methods in the paper's order, columns = GLUE tasks (test
  scores, 0-100; MRPC/QQP "acc/F1", STS-B "Pearson/Spearman" as the paper), the averages and
  "% trained" (trainable / backbone), then the paper's own numbers where they are known;
  `table2.*` the same for SuperGLUE when there are SuperGLUE runs;
* `selection.csv`: every run, its validation and test score, and which one was chosen;
* `low_resource.png`, `low_resource.csv`: test score against training-set size per method,
  one panel per task (runs with `--config.train_samples`; DP runs only with `--low-resource-dp`).

Differentially private runs (`paper_runs --dp-epsilons`) are rows of their own under their
method's row, one per privacy level, titled with the epsilon they spent ("Compacter++ (DP,
ε=3)"; `experiments.paper_dp`); the (epsilon, delta) of each task is noted under the table.

Missing runs are blanks, never zeros; averages are over the tasks present, marked "(k/n)" when
some are missing.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.atomic import atomic_write
from compacter_jax.models.config import is_random
from compacter_jax.params import report
from experiments import paper, paper_dp, tool_cli
from experiments.configs import paper as paper_config
from experiments.run_results import (SUMMARY_FILE, RunResult, read_runs, select_best,
                                     task_score)

TABLES = {"table1": ("GLUE", paper.GLUE_TASKS), "table2": ("SuperGLUE", paper.SUPERGLUE_TASKS)}

# Recipe fields compared with configs/paper.py to flag runs off the paper's recipe.
RECIPE_FIELDS = ("batch_size", "warmup_steps", "epochs", "max_steps", "max_source_length",
                 "max_eval_samples", "weight_decay", "clip_norm", "seed", "data_seed", "dtype",
                 "optimizer", "resize_vocab_to_tokenizer")


# ------------------------------------------------------------------------------ tables


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: the test metrics of each task present, and what the row averages.

    Attributes:
      method: registry name; source: "ours" or "paper".
      cells: task -> {metric: value} for the tasks present.
      percent_trained: (min, max) over the row's runs, or None when unknown.
      average: a reported average standing in for the computed one (paper rows only).
      title: the row's title when not the method's (DP rows: "Compacter++ (DP, ε=3)").
      extra: more CSV columns of the row (DP rows: the epsilon and delta spent).
    """

    method: str
    source: str
    cells: Mapping[str, Mapping[str, float]]
    percent_trained: tuple[float, float] | None
    average: float | None = None
    title: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def row_averages(row: Row, tasks: Sequence[str]) -> tuple[float | None, float | None, int]:
    """(mean of every value in the row, as the paper's Avg; mean of the task scores; number
    of tasks present)."""
    present = [t for t in tasks if t in row.cells]
    if row.average is not None and not present:
        return row.average, None, 0
    if not present:
        return None, None, 0
    values = [row.cells[t][m] for t in present for m in data_lib.get_task(t).metric_names]
    scores = [task_score(t, row.cells[t]) for t in present]
    return float(np.mean(values)), float(np.mean(scores)), len(present)


@functools.lru_cache(maxsize=None)
def backbone_size(model: str) -> int | None:
    """T5 weights of `model` (embedding included, PEFT excluded), from its sizes alone; None
    when the model's config cannot be read here (not a preset or a local directory)."""
    try:
        return report(paper.model_config(model), peft.Method()).backbone
    except (ValueError, OSError):
        return None


def percent_trained(run: RunResult) -> float:
    """100 x trainable / backbone (the total parameter count when the backbone is unknown)."""
    return 100.0 * run.trainable_params / (backbone_size(run.model) or run.total_params)


def measured_rows(best: Mapping[tuple, RunResult], tasks: Sequence[str]) -> list[Row]:
    """One row per method with a full-data run on any of `tasks`, in the paper's order."""
    chosen = {k: r for k, r in best.items() if k[2] is None and k[1] in tasks}
    methods = {m for m, _, _ in chosen}
    order = [m for m in paper.PAPER_METHODS if m in methods] + sorted(
        methods - set(paper.PAPER_METHODS))
    return [measured_row(method, {t: chosen[(method, t, None)] for t in tasks
                                  if (method, t, None) in chosen}) for method in order]


def method_title(method: str, models: Iterable[str]) -> str:
    """The display name of `method` run on `models`: the paper's title, except that full
    fine-tuning is named after its backbone (the paper's "T5-base (full)" only on T5-base)."""
    if method != "full":
        return paper.METHOD_TITLES.get(method, method)
    names = sorted({Path(m.rstrip("/")).name for m in models})
    if not names or names == [Path(paper.PAPER_MODEL).name]:
        return paper.METHOD_TITLES["full"]
    return f"Full fine-tuning ({', '.join(names)})"


def measured_row(method: str, runs: Mapping[str, RunResult]) -> Row:
    """The row of `method` from its chosen run per task."""
    cells = {t: {m: r.test[m] for m in data_lib.get_task(t).metric_names}
             for t, r in runs.items() if task_score(t, r.test) is not None}
    pcts = [percent_trained(r) for r in runs.values()]
    return Row(method, "ours", cells, (min(pcts), max(pcts)),
               title=method_title(method, (r.model for r in runs.values())))


def paper_rows(methods: Sequence[str]) -> list[Row]:
    """The paper's reported GLUE numbers for `methods` (those it has any number for)."""
    rows = []
    for m in methods:
        pct = paper.PAPER_PERCENT_TRAINED.get(m)
        cells = paper.PAPER_GLUE_SCORES.get(m, {})
        if pct is not None or cells or m in paper.PAPER_GLUE_AVERAGES:
            rows.append(Row(m, "paper", cells, None if pct is None else (pct, pct),
                            paper.PAPER_GLUE_AVERAGES.get(m)))
    return rows


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _pct(p: tuple[float, float] | None) -> str:
    if p is None:
        return ""
    lo, hi = (f"{v:.3f}" if v < 100 else "100" for v in p)
    return lo if lo == hi else f"{lo}–{hi}"


def _avg(value: float | None, present: int, total: int) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" + ("" if present in (0, total) else f" ({present}/{total})")


def markdown_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    head = ["method", "% trained", *(paper.TASK_TITLES.get(t, t) for t in tasks), "avg",
            "avg (task scores)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        avg, task_avg, present = row_averages(row, tasks)
        cells = ["/".join(_num(row.cells[t][m]) for m in data_lib.get_task(t).metric_names)
                 if t in row.cells else "" for t in tasks]
        lines.append("| " + " | ".join([row.title or paper.METHOD_TITLES.get(row.method,
                                                                          row.method),
                                        _pct(row.percent_trained), *cells,
                                        _avg(avg, present, len(tasks)),
                                        _avg(task_avg, present, len(tasks))]) + " |")
    return "\n".join(lines)


def csv_records(rows: Sequence[Row], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """Numeric columns: `TASK` (task score) and `TASK.METRIC` for tasks with several metrics."""
    out = []
    for row in rows:
        avg, task_avg, present = row_averages(row, tasks)
        rec: dict[str, Any] = {"source": row.source, "method": row.method,
                               "percent_trained_min": row.percent_trained[0]
                               if row.percent_trained else "",
                               "percent_trained_max": row.percent_trained[1]
                               if row.percent_trained else "", **row.extra}
        for t in tasks:
            names = data_lib.get_task(t).metric_names
            score = task_score(t, row.cells[t]) if t in row.cells else None
            rec[t] = "" if score is None else round(score, 4)
            if len(names) > 1:
                for m in names:
                    rec[f"{t}.{m}"] = row.cells[t][m] if t in row.cells else ""
        rec.update(avg="" if avg is None else round(avg, 4),
                   avg_task_scores="" if task_avg is None else round(task_avg, 4),
                   tasks_present=present, tasks_total=len(tasks))
        out.append(rec)
    return out


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    fields = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerows(records)
    return atomic_write(path, buffer.getvalue())


def recipe_notes(runs: Iterable[RunResult]) -> list[str]:
    """Where runs depart from configs/paper.py's recipe (e.g. "max_steps=4 (3 runs)")."""
    counts: dict[str, int] = {}
    for r in runs:
        reference = paper_config.get_config(f"{r.task},{r.method}")
        for field in RECIPE_FIELDS:
            if field in r.run_config and r.run_config[field] != reference[field]:
                key = f"{field}={r.run_config[field]}"
                counts[key] = counts.get(key, 0) + 1
        if r.model != paper.PAPER_MODEL:
            counts[f"model={r.model}"] = counts.get(f"model={r.model}", 0) + 1
    return [f"{k} ({n} run{'s' * (n > 1)})" for k, n in sorted(counts.items())]


def table_markdown(title: str, tasks: Sequence[str], rows: Sequence[Row],
                   reference: Sequence[Row], runs: Sequence[RunResult],
                   unreadable: Sequence[str] = (), private: Sequence[str] = ()) -> str:
    """The table's markdown and its notes (`private`: the DP rows' (epsilon, delta) lines)."""
    models = sorted({r.model for r in runs})
    parts = [f"# {title}: test scores at the best validation configuration", "",
             markdown_table(rows, tasks) if rows else "No full-data runs on these tasks."]
    if reference:
        parts += ["", "The paper (T5-base), as reported:", "", markdown_table(reference, tasks)]
    parts += ["", "- Cells: test scores (0-100) of the configuration with the best validation "
              "score per method and task (`selection.csv`). MRPC, QQP: accuracy/F1; STS-B: "
              "Pearson/Spearman; CoLA: Matthews correlation; CB: F1/accuracy; MultiRC, "
              "ReCoRD: F1/EM; others: accuracy. Blank: no run.",
              "- avg: mean of every value in the row, as the paper's Avg column; avg (task "
              "scores): mean of the task scores (a task's score is the mean of its metrics). "
              "(k/n): over the k of n tasks present only.",
              "- % trained: trainable / backbone parameters; a range when the chosen "
              "configurations differ between tasks.",
              f"- Model: {', '.join(models) or 'none'}."]
    if any(is_random(m) for m in models):
        parts.append("- **Random backbone: these scores mean nothing.**")
    if notes := recipe_notes(runs):
        parts.append("- Off the paper's recipe: " + "; ".join(notes) + ".")
    if private:
        parts += ["- DP rows (differentially private runs, selected among themselves on "
                  "validation), the privacy each task's chosen run spent:",
                  *("  " + line for line in private)]
    if reference:
        parts.append(f"- Paper numbers: {paper.PAPER_SOURCES}")
    if unreadable:
        parts.append("- Left out (unreadable summary.json; their runs show as missing): "
                     + "; ".join(unreadable) + ".")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------ the figure


def low_resource_points(best: Mapping[tuple, RunResult]) -> list[RunResult]:
    """The chosen low-resource runs, sorted by task, method, privacy and size (`best` of
    `select_best`, with `paper_dp.select_best`'s DP runs when they are to be plotted)."""
    return sorted((r for key, r in best.items() if key[-1] is not None),
                  key=lambda r: (r.task, r.method, _line(r), r.train_samples))


def _line(run: RunResult) -> tuple:
    """A figure line: one per method and privacy level (() for the non-private runs)."""
    return paper_dp.level(run) if paper_dp.is_private(run) else ()


def plot_low_resource(points: Sequence[RunResult], path: Path) -> Path:
    """Test score against training-set size, one line per method, one panel per task (PNG;
    matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r.task for r in points))
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    order = {m: i for i, m in enumerate(paper.PAPER_METHODS)}
    lines = sorted({(r.method, _line(r)) for r in points},
                   key=lambda k: (order.get(k[0], 99), k))
    color = {k: f"C{i % 10}" for i, k in enumerate(lines)}  # one colour per method (and DP)
    for ax, task in zip(axes, tasks):
        mine = [r for r in points if r.task == task and r.test_score is not None]
        for key in lines:
            runs = [r for r in mine if (r.method, _line(r)) == key]
            if not runs:
                continue
            ax.plot(*zip(*[(r.train_samples, r.test_score) for r in runs]), marker="o",
                    color=color[key], label=paper_dp.title(key[0], runs) if key[1] else
                    method_title(key[0], (r.model for r in runs)))
        sizes = sorted({r.train_samples for r in mine})
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set(title=paper.TASK_TITLES.get(task, task), xlabel="training examples",
               ylabel="test score")
        ax.legend(fontsize=7)
    for ax in axes[len(tasks):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)  # the temporary's name has no .png: give matplotlib the format
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110,
                                                      format=path.suffix[1:] or "png"))


# ------------------------------------------------------------------------------ the CLI


def _workdir(run: RunResult, runs_root: Path | None) -> str:
    """The run's directory, relative to `runs_root` when under it (tables that travel)."""
    workdir = Path(run.workdir)
    if runs_root is not None and workdir.is_relative_to(runs_root):
        return workdir.relative_to(runs_root).as_posix()
    return str(workdir)


def _selection_records(runs: Sequence[RunResult], best: Mapping[tuple, RunResult],
                       runs_root: Path | None):
    chosen = {id(r) for r in best.values()}
    return [{"method": r.method, "task": r.task, "train_samples": r.train_samples or "",
             "config": r.config, "validation_score": _num(r.validation_score),
             "test_score": _num(r.test_score), "selected": id(r) in chosen,
             "dp_epsilon": r.privacy["epsilon"] if r.privacy else "",
             "dp_delta": r.privacy["delta"] if r.privacy else "",
             "workdir": _workdir(r, runs_root)} for r in runs]


def write_all(runs: Sequence[RunResult], out: Path, unreadable: Sequence[str] = (),
              low_resource_dp: bool = False, runs_root: Path | None = None) -> dict[str, Path]:
    """Writes the tables, selection.csv and the low-resource figure; returns name -> path.
    `unreadable` ("PATH: why" of summaries left out) is noted under every table. DP runs are
    selected per privacy level apart from the others (`experiments.paper_dp`) and join the
    figure only with `low_resource_dp`. The csv files name each run's directory relative to
    `runs_root` when it is under it."""
    out.mkdir(parents=True, exist_ok=True)
    best = select_best(r for r in runs if not paper_dp.is_private(r))
    best_dp = paper_dp.select_best(runs, select_best)
    written = {"selection.csv": write_csv(out / "selection.csv", _selection_records(
        runs, {**best, **best_dp}, runs_root))}
    for name, (title, tasks) in TABLES.items():
        table_runs = [r for r in runs if r.task in tasks and r.train_samples is None]
        if name != "table1" and not table_runs:
            continue
        private, private_notes = paper_dp.rows(best_dp, tasks, measured_row)
        rows = paper_dp.interleave(measured_rows(best, tasks), private)
        reference = paper_rows(paper.PAPER_METHODS) if name == "table1" else []
        title = f"Table {name[-1]} ({title})"
        written[f"{name}.md"] = atomic_write(
            out / f"{name}.md", table_markdown(title, tasks, rows, reference, table_runs,
                                               unreadable, private_notes))
        written[f"{name}.csv"] = write_csv(out / f"{name}.csv",
                                           csv_records([*rows, *reference], tasks))
    if points := low_resource_points({**best, **(best_dp if low_resource_dp else {})}):
        written["low_resource.png"] = plot_low_resource(points, out / "low_resource.png")
        written["low_resource.csv"] = write_csv(out / "low_resource.csv", [
            {"method": r.method, "task": r.task, "train_samples": r.train_samples,
             "config": r.config, "validation_score": r.validation_score,
             "test_score": "" if r.test_score is None else r.test_score,
             "dp_epsilon": r.privacy["epsilon"] if r.privacy else "",
             "workdir": _workdir(r, runs_root)} for r in points])
    return written


def chosen_runs(runs_dir: Path, out: Path,
                model: str | None) -> tuple[list[RunResult], list[str]]:
    """(the readable runs below `runs_dir`, on `model` when given; "PATH: why" of each
    unreadable summary, also printed as a warning). Raises ValueError naming the directory
    or flag when no table can be made."""
    if not runs_dir.is_dir():
        raise ValueError(f"{runs_dir} is not a directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory: name a directory for the "
                         "tables")
    runs, unreadable = read_runs(runs_dir)
    for why in unreadable:
        print(f"warning: left out (shown as missing): {why}", file=sys.stderr)
    if model:
        runs = [r for r in runs if r.model == model]
    models = sorted({r.model for r in runs})
    if not runs:
        raise ValueError(f"no readable {SUMMARY_FILE} below {runs_dir}"
                         + (f" with model {model!r}" if model else ""))
    if len(models) > 1:
        raise ValueError(f"runs on several backbones ({', '.join(models)}): pick one with "
                         "--model (configurations are compared on one backbone)")
    return runs, unreadable


def run(args: argparse.Namespace) -> int:
    runs, unreadable = chosen_runs(args.runs_dir, args.out, args.model)
    written = write_all(runs, args.out, unreadable, low_resource_dp=args.low_resource_dp,
                        runs_root=args.runs_dir)
    print(written["table1.md"].read_text())
    for name, path in written.items():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_cli.parser("experiments.paper_table", __doc__)
    parser.add_argument("runs_dir", type=Path, help="directory holding the runs")
    parser.add_argument("--out", type=Path, required=True, help="where the tables go")
    parser.add_argument("--model", help="only runs on this backbone (needed when several)")
    parser.add_argument("--low-resource-dp", action="store_true", help="plot the low-resource "
                        "DP runs too (a line per method and privacy level)")
    return tool_cli.run(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
