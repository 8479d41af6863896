"""Markdown table and plot of efficiency rows (lists of dicts from `measure.measure`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _reference(rows: list[Row], reference: str) -> Row | None:
    return next((r for r in rows if r["method"] == reference and "error" not in r), None)


def _ratio(row: Row, ref: Row | None, key: str) -> str:
    if ref is None or row.get(key) is None or not ref.get(key):
        return "–"
    return f"{row[key] / ref[key]:.2f}x"


def _num(x: Any, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def markdown_table(rows: list[Row], reference: str = "full") -> str:
    """One line per method: absolute numbers and ratios against `reference` (full FT)."""
    ref = _reference(rows, reference)
    head = ("| method | trainable params | % of total | step time (s) | step / full | "
            "step CPU-s | CPU / full | examples/s | peak mem (MB) | mem / full | train-phase RSS (MB) | compile (s) | "
            "generation (s) | XLA step peak (MB) | XLA / full |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:80]} |" + " |" * 13)
            continue
        pct = 100.0 * r["trainable_params"] / r["total_params"] if r.get("total_params") else None
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {_num(pct, '.3f')} | "
            f"{r['step_time_s']:.3f} | {_ratio(r, ref, 'step_time_s')} | "
            f"{_num(r.get('step_cpu_s'), '.2f')} | {_ratio(r, ref, 'step_cpu_s')} | "
            f"{r['examples_per_s']:.2f} | {r['peak_memory_mb']:.0f} | "
            f"{_ratio(r, ref, 'peak_memory_mb')} | {_num(r.get('train_peak_rss_mb'), '.0f')} | "
            f"{r['compile_time_s']:.1f} | {_num(r.get('generation_time_s'), '.3f')} | "
            f"{_num(r.get('xla_step_peak_mb'), '.0f')} | {_ratio(r, ref, 'xla_step_peak_mb')} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str | Path, reference: str = "full", title: str = "") -> bool:
    """Bar chart of step time and peak memory per method relative to `reference`; False when
    there is no reference row to divide by."""
    ref = _reference(rows, reference)
    ok = [r for r in rows if "error" not in r]
    if ref is None or not ok:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r["method"] for r in ok]
    step = [r["step_time_s"] / ref["step_time_s"] for r in ok]
    mem = [r["peak_memory_mb"] / ref["peak_memory_mb"] for r in ok]
    x = np.arange(len(ok))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 2), 4))
    ax.bar(x - 0.2, step, 0.4, label="train step time")
    ax.bar(x + 0.2, mem, 0.4, label="peak memory")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel(f"relative to {reference}")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
