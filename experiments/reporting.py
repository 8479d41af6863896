"""What a fine-tuning run leaves behind: metrics.jsonl, TensorBoard events, a progress bar,
a closing summary table and a learning-curve plot."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import tqdm

from compacter_jax.atomic import atomic_write

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
log = logging.getLogger(__name__)


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                    if isinstance(v, (int, float)))


class MetricsWriter:
    """Appends one JSON object per event to DIR/metrics.jsonl (keys: `step` and metric names
    such as `train/loss`, `validation/accuracy`) and mirrors scalars to TensorBoard.

    Each record is one `write` of one line to a file opened for appending, so a kill leaves at
    most a torn last line, which `read` skips. With `enabled=False` (processes other than 0 of
    a multi-process run) nothing is written and `read` still works.
    """

    def __init__(self, workdir: Path, enabled: bool = True):
        self.path = Path(workdir) / METRICS_FILE
        self.enabled = enabled
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # TensorBoard events without TensorFlow

            self.tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3),
                  **{k: float(v) for k, v in metrics.items()}}
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        for k, v in metrics.items():
            if math.isfinite(float(v)):
                self.tb.add_scalar(k, float(v), int(step))
        self.tb.flush()

    def _records(self) -> list[dict[str, Any]]:
        """Every well-formed record in file order; a torn or garbled line (a kill during a
        write) is skipped with a warning naming the file and line."""
        if not self.path.exists():
            return []
        out = []
        text = self.path.read_bytes().decode("utf-8", "replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not a metrics record")
            except ValueError as e:
                log.warning("%s:%d: skipping a malformed line (%s)", self.path, lineno, e)
                continue
            out.append(record)
        return out

    @staticmethod
    def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        latest: dict[tuple, dict] = {}
        for record in records:
            key = (record["step"], tuple(sorted(k for k in record if k not in ("step", "time"))))
            latest.pop(key, None)
            latest[key] = record
        return sorted(latest.values(), key=lambda r: (r["step"], r.get("time", 0)))

    def read(self) -> list[dict[str, Any]]:
        """All events; after a resume, a step's later record replaces the earlier one with
        the same metric names (the steps after the last checkpoint ran twice)."""
        return self._dedupe(self._records())

    def resume_at(self, step: int) -> int:
        """Rewrites metrics.jsonl (atomically) for a run resumed at `step`: keeps the
        well-formed records of steps <= `step`, one per (step, metric names), drops test
        records (recomputed at the end) and everything later (recomputed by the resumed run).
        Returns the number of well-formed records dropped (malformed lines go too)."""
        if not self.enabled or not self.path.exists():
            return 0
        records = self._records()
        kept = [r for r in self._dedupe(records) if r["step"] <= step
                and not any(k.startswith("test/") for k in r)]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Progress:
    """A tqdm bar over training steps showing the loss and throughput (examples/s)."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int = 0,
                 enabled: bool = True):
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, disable=not enabled)
        self.batch_size = batch_size
        self.last_time = time.perf_counter()
        self.last_step = start_step

    def update(self, step: int, window: list[dict]) -> None:
        now = time.perf_counter()
        done = step - self.last_step
        rate = done * self.batch_size / max(now - self.last_time, 1e-9)
        self.bar.update(done)
        self.bar.set_postfix(loss=f"{np.mean([m['loss'] for m in window]):.4f}",
                             ex_per_s=f"{rate:.1f}")
        self.last_time, self.last_step = now, step

    def note(self, message: str) -> None:
        if not self.bar.disable:
            self.bar.write(message)
        self.last_time = time.perf_counter()  # evaluation time is not training throughput

    def close(self) -> None:
        self.bar.close()


def write_summary(workdir: Path, summary: dict[str, Any], table: bool = True) -> str:
    """Writes DIR/summary.json (atomically) and returns (and prints) a closing table of a
    fine-tuning summary (`table=False`: none, "" returned). Runs call it through
    `experiments.run.write_summary` (process 0 only)."""
    text = json.dumps(summary, indent=2, sort_keys=True)
    atomic_write(Path(workdir) / SUMMARY_FILE, text)
    if not table:
        return ""
    rows = [("task", summary["task"]), ("method", summary["method"]),
            ("model", summary["model"]),
            ("trainable params", f"{summary['trainable_params']:,} of "
             f"{summary['total_params']:,} "
             f"({100 * summary['trainable_params'] / summary['total_params']:.3f}%)"),
            ("steps (best at)", f"{summary['steps']} ({summary['best_step']})")]
    for split in ("validation", "test"):
        metrics = {k.split("/", 1)[-1]: v for k, v in summary.get(split, {}).items()
                   if k not in ("step", "time")}
        if metrics:
            rows.append((split, format_metrics(metrics)))
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"| {k:<{width}} | {v} |" for k, v in rows)
    print(table, flush=True)
    return table


def plot_curves(history: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss and validation score against steps, as a PNG (no pyplot: the caller's
    matplotlib backend, e.g. a notebook's inline one, is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    ax_loss, ax_eval = fig.subplots(1, 2)
    train = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    if train:
        ax_loss.plot(*zip(*train), label="train loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    evals = [h for h in history if "validation/score" in h]
    for key in sorted({k for h in evals for k in h if k.startswith("validation/")}
                      - {"validation/num_invalid"}):
        points = [(h["step"], h[key]) for h in evals if key in h]
        ax_eval.plot(*zip(*points), marker="o", label=key.split("/", 1)[1])
    ax_eval.set(xlabel="step", ylabel="metric (0-100)", title="validation")
    if evals:
        ax_eval.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)  # the temporary's name has no .png: give matplotlib the format
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110,
                                                      format=path.suffix[1:] or "png"))
