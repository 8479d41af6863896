"""The differentially private rows of the paper's tables (`experiments.paper_table`).

A DP run (`paper_runs --dp-epsilons`, `experiments.dp`) writes its mechanism and the
(epsilon, delta) it spent into `summary.json` under "privacy". Its test scores go in a row of
their own under the method's row, one per privacy level: "Compacter++ (DP, ε=3)", the epsilon
the row's chosen runs actually spent (the largest of them; a range when they differ), never
mixed with the non-private runs of the method (they are selected among themselves). A level is
the run's target epsilon, or its noise multiplier when it was run without a target.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from experiments import paper


RECORD_KEYS = ("epsilon", "delta", "noise_multiplier", "clip_norm")  # what the rows show


def check_record(privacy: Any) -> dict[str, Any]:
    """The "privacy" record of a summary.json, checked; ValueError naming what is missing."""
    if not isinstance(privacy, Mapping):
        raise ValueError(f'"privacy" is a {type(privacy).__name__}, not an object')
    missing = [k for k in RECORD_KEYS if not isinstance(privacy.get(k), (int, float))]
    if missing:
        raise ValueError(f'"privacy" has no numeric {missing} (not written by experiments.dp)')
    return dict(privacy)


def is_private(run) -> bool:
    """True for a run whose summary.json has the "privacy" record of a DP run."""
    return bool(getattr(run, "privacy", None))


def level(run) -> tuple[str, float]:
    """The privacy level a DP run is grouped by: ("epsilon", target) or ("sigma", noise)."""
    p = run.privacy
    if p.get("target_epsilon") is not None:
        return "epsilon", float(p["target_epsilon"])
    return "sigma", float(p["noise_multiplier"])


def select_best(runs: Iterable, select) -> dict[tuple, Any]:
    """(method, level, task, train_samples) -> the chosen DP run, `select` (the non-private
    rule: best validation score) applied to each privacy level on its own."""
    by_level: dict[tuple[str, float], list] = {}
    for run in runs:
        if is_private(run):
            by_level.setdefault(level(run), []).append(run)
    return {(method, lvl, task, size): run
            for lvl, group in by_level.items()
            for (method, task, size), run in select(group).items()}


def _range(values: Sequence[float], fmt: str) -> str:
    lo, hi = (format(v, fmt) for v in (min(values), max(values)))
    return lo if lo == hi else f"{lo}–{hi}"


def title(method: str, runs: Sequence) -> str:
    """The row's title, e.g. "Compacter++ (DP, ε=3)": the epsilon the runs spent (3
    significant digits; "ε=2.1–5.3" when they differ at that precision)."""
    name = paper.METHOD_TITLES.get(method, method)
    return f"{name} (DP, ε={_range([float(r.privacy['epsilon']) for r in runs], '.3g')})"


def rows(best: Mapping[tuple, Any], tasks: Sequence[str],
         make_row) -> tuple[list, list[str]]:
    """The full-data DP rows on `tasks`, by method (paper order) then level, and their notes.

    Args:
      best: `select_best`'s choice.
      tasks: the table's tasks.
      make_row: (method, {task: run}) -> the table's Row of these runs.
    Returns:
      (Rows with `title` and the CSV columns of their privacy (`dp_*`) set; one note line per
      row: the (epsilon, delta) and noise of each task's chosen run).
    """
    groups: dict[tuple[str, tuple], dict[str, Any]] = {}
    for (method, lvl, task, size), run in best.items():
        if size is None and task in tasks:
            groups.setdefault((method, lvl), {})[task] = run
    order = {m: i for i, m in enumerate(paper.PAPER_METHODS + paper.EXTRA_METHODS)}
    out, lines = [], []
    for method, lvl in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k)):
        runs = {t: groups[(method, lvl)][t] for t in tasks if t in groups[(method, lvl)]}
        spent = [float(r.privacy["epsilon"]) for r in runs.values()]
        deltas = [float(r.privacy["delta"]) for r in runs.values()]
        row = dataclasses.replace(
            make_row(method, runs), source="ours (DP)", title=title(method, list(runs.values())),
            extra={f"dp_target_{lvl[0]}": lvl[1], "dp_epsilon_min": min(spent),
                   "dp_epsilon_max": max(spent), "dp_delta_min": min(deltas),
                   "dp_delta_max": max(deltas)})
        out.append(row)
        lines.append(_note(row.title, runs))
    return out, lines


def _note(row_title: str, runs: Mapping[str, Any]) -> str:
    per_task = "; ".join(
        f"{paper.TASK_TITLES.get(t, t)} ε={float(r.privacy['epsilon']):.3g}, "
        f"δ={float(r.privacy['delta']):.2g}, σ={float(r.privacy['noise_multiplier']):.3g}"
        for t, r in runs.items())
    first = next(iter(runs.values())).privacy
    clips = [float(r.privacy["clip_norm"]) for r in runs.values()]
    return (f"- {row_title}: {per_task} (clip norm {_range(clips, 'g')}, "
            f"{first.get('sampling', 'poisson')} sampling, {first.get('accountant', '?')} "
            "accountant; `summary.json` \"privacy\").")


def interleave(plain: Sequence, private: Sequence) -> list:
    """The table's rows: each method's DP rows right under its non-private row (after the
    last rows when the method has none)."""
    out, placed = [], set()
    for row in plain:
        out.append(row)
        mine = [r for r in private if r.method == row.method]
        out += mine
        placed.update(id(r) for r in mine)
    return out + [r for r in private if id(r) not in placed]
