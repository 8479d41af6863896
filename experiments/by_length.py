r"""A finished run's score by input length, from its saved predictions:

    python -m experiments.by_length NAME=RUN[,RUN...] [NAME=RUN...] [--split validation] \
        [--edges 5,10,20] [--out by_length.json]

Each RUN is an `experiments.glue` workdir; it holds `summary.json` (the task) and
`predictions/{split}.jsonl` (what `experiments.evaluation.Evaluator` wrote: the validation
split's at the run's last evaluation, the test split's at its best validation step). The rows
are put in buckets by the number of words of the example's own text (`text_words`: the task
prefix and field names such as "sentence:" left out) between `--edges` ([0, 5), [5, 10),
[10, 20), [20, inf) by default, and "all" rows), and each bucket is scored with the task's metrics
(`data.compute_metrics` on the generated texts). The runs named together (e.g. the seeds of one
configuration) are reported as mean ± sample standard deviation. Printed as a markdown table;
`--out` writes {name: {bucket: {"rows", "score", "sd", "runs"}}} as JSON, atomically.

Why: on SST-2 the paper's validation split (1,000 rows held out of GLUE train) is 37% phrases
of fewer than five words, while the test split (GLUE's validation sentences) is 86% sentences
of ten or more, so one backbone comparison can differ between the splits (docs/small_scale.md).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax.atomic import atomic_write
from experiments import tool_cli
from experiments.run_results import SUMMARY_FILE, load_run

ALL = "all"  # the bucket of every row: the run's own score on the split


def text_words(source: str, task: str) -> int:
    """Words of an example's own text in a model input such as "sst2 sentence: a fine film":
    whitespace tokens other than field names ("sentence:") and a leading task prefix (the
    original's task name, `Task.prefix`)."""
    words = source.split()
    if words and words[0] == data_lib.get_task(task).prefix:
        words = words[1:]
    return sum(not w.endswith(":") for w in words)


def bucket_names(edges: Sequence[int]) -> list[str]:
    """"[0, 5)", ..., "[20, inf)", "all" for edges (5, 10, 20)."""
    bounds = [0, *edges, math.inf]
    return [f"[{lo}, {hi})" for lo, hi in zip(bounds[:-1], bounds[1:])] + [ALL]


def bucket_scores(rows: Sequence[dict], task: str, edges: Sequence[int]) -> dict[str, dict]:
    """The task's score (0-100, mean of its metrics) and row count per length bucket.

    Args:
      rows: predictions rows ({"source", "prediction", "reference", ...}).
      task: the task's registry name (its metrics and its prefix).
      edges: increasing bucket boundaries in words.

    Returns:
      {bucket name: {"rows": int, "score": float or None (an empty bucket)}}, the last
      bucket, "all", every row.
    """
    lengths = np.array([text_words(r["source"], task) for r in rows])
    which = np.searchsorted(np.asarray(edges), lengths, side="right")
    out = {}
    for k, name in enumerate(bucket_names(edges)):
        picked = rows if name == ALL else [r for r, b in zip(rows, which) if b == k]
        score = (data_lib.compute_metrics(task, [r["prediction"] for r in picked],
                                          [r["reference"] for r in picked])["score"]
                 if picked else None)
        out[name] = {"rows": len(picked), "score": score}
    return out


def read_predictions(run: Path, split: str) -> tuple[str, list[dict]]:
    """(the run's task, its `split` predictions rows). Raises FileNotFoundError naming the
    missing file, ValueError (`run_results.load_run`) naming an unreadable summary."""
    summary, predictions = run / SUMMARY_FILE, run / "predictions" / f"{split}.jsonl"
    for path in (summary, predictions):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: RUN must be a finished "
                                    "experiments.glue workdir")
    task = load_run(summary).task
    with open(predictions) as f:
        return task, [json.loads(line) for line in f if line.strip()]


def compare(named_runs: dict[str, list[Path]], split: str,
            edges: Sequence[int]) -> dict[str, dict]:
    """{name: {bucket: {"rows", "score" (mean over the name's runs), "sd" (None for one run),
    "runs"}}}. Raises ValueError when runs named together are of different tasks."""
    result = {}
    for name, runs in named_runs.items():
        read = [read_predictions(run, split) for run in runs]
        if len({task for task, _ in read}) > 1:
            raise ValueError(f"{name}: runs of different tasks ({', '.join(map(str, runs))})")
        per_run = [bucket_scores(rows, task, edges) for task, rows in read]
        result[name] = {}
        for bucket in bucket_names(edges):
            scores = [b[bucket]["score"] for b in per_run if b[bucket]["score"] is not None]
            result[name][bucket] = {
                "rows": per_run[0][bucket]["rows"],
                "score": float(np.mean(scores)) if scores else None,
                "sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else None,
                "runs": len(scores)}
    return result


def markdown(result: dict[str, dict]) -> str:
    """One row per name, one column per bucket: "score ± sd (rows)"."""
    buckets = list(next(iter(result.values())))
    lines = ["| run | " + " | ".join(b if b == ALL else f"{b} words" for b in buckets) + " |",
             "|---|" + "---:|" * len(buckets)]
    for name, by_bucket in result.items():
        cells = []
        for b in buckets:
            s = by_bucket[b]
            score = "–" if s["score"] is None else f"{s['score']:.1f}"
            sd = f" ± {s['sd']:.1f}" if s["sd"] is not None else ""
            cells.append(f"{score}{sd} ({s['rows']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _named_runs(text: str) -> tuple[str, list[Path]]:
    name, sep, runs = text.partition("=")
    if not sep or not name or not runs:
        raise ValueError(f"{text!r}: write NAME=RUN[,RUN...], e.g. pretrained=runs/sst2,"
                         "runs/sst2/seed1")
    return name, [Path(r) for r in runs.split(",")]


def run(args) -> int:
    named = dict(_named_runs(t) for t in args.runs)
    if list(args.edges) != sorted(set(args.edges)):
        raise ValueError(f"--edges {args.edges}: give increasing word counts, e.g. 5,10,20")
    result = compare(named, args.split, args.edges)
    print(markdown(result), end="")
    if args.out:
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = tool_cli.parser("experiments.by_length", __doc__)
    parser.add_argument("runs", nargs="+", help="NAME=RUN[,RUN...] (runs averaged together)")
    parser.add_argument("--split", default="validation", help="validation or test")
    parser.add_argument("--edges", default=[5, 10, 20],
                        type=tool_cli.csv_list(int, lambda n: n > 0, "positive word counts",
                                               "5,10,20"))
    parser.add_argument("--out", type=Path, help="JSON file for the scores")
    return tool_cli.run(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
