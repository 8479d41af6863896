"""Efficiency of the PEFT methods: params, train-step time, peak memory, compile and
generation time, each method in its own subprocess; ratios against full fine-tuning.

    python -m benchmarks.efficiency --model random:t5-base --methods full,compacter,compacter++ \
        --batch 8 --src-len 128 --tgt-len 8 --steps 5 --json out.json

Writes `out.json` (a list of rows, see `benchmarks.measure`), `out.md` (the markdown table of
ratios, also printed) and `out.png` (step time and memory relative to full). Options:
`--dtype bfloat16`, `--scan/--no-scan` (scan over layers; default on), `--remat`,
`--per-example-dropout`, `--peak-tflops` (for the MFU estimate on an accelerator),
`--cpu-memory-scheduler` (XLA:CPU schedules the step for memory instead of concurrency).
What each number means and how it is measured: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.measure import BenchConfig
from compacter_jax.peft import method_names

ALL_METHODS = ("full", "adapter", "pfeiffer", "lowrank", "phm_adapter", "compacter",
               "compacter++", "bitfit", "prompt_tuning", "lora", "lst")
ROOT = Path(__file__).resolve().parent.parent


def run_child(cfg: BenchConfig, timeout: float | None = None) -> dict[str, Any]:
    """Measures `cfg` in a fresh Python process; a failure becomes a row with `error`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.efficiency", "--child-config",
               json.dumps(dataclasses.asdict(cfg)), "--child-out", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"method": cfg.method, "model": cfg.model,
                    "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"method": cfg.method, "model": cfg.model,
                    "error": f"exit {proc.returncode}: " + " / ".join(tail)}
        row = json.loads(out.read_text())
        row["child_wall_s"] = time.perf_counter() - start
        return row


def run_all(base: BenchConfig, methods: list[str], timeout: float | None = None,
            log=print) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        cfg = dataclasses.replace(base, method=method)
        row = run_child(cfg, timeout)
        rows.append(row)
        if "error" in row:
            log(f"[{method}] FAILED: {row['error']}")
        else:
            log(f"[{method}] {row['trainable_params']:,} trainable, step "
                f"{row['step_time_s']:.3f} s ({row['step_cpu_s']:.2f} CPU s), peak {row['peak_memory_mb']:.0f} MB (XLA step {row.get('xla_step_peak_mb') or 0:.0f} MB), compile "
                f"{row['compile_time_s']:.1f} s, generation {row['generation_time_s'] or 0:.3f} s "
                f"(child {row['child_wall_s']:.0f} s)")
    return rows


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in method_names()]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad or text!r}; choose from "
                         f"{', '.join(method_names())}")
    return methods


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:t5-base",
                   help="checkpoint dir, cached Hub id or random:<preset>")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated PEFT presets (default: all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed train steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generations; 0 = skip")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                   help="scan over layers (methods with per-block adapters never scan)")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=False,
                   help="rematerialise each block in the backward pass")
    p.add_argument("--per-example-dropout", action=argparse.BooleanOptionalAction,
                   default=False, help="train step's per-example dropout keys (vmap)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak TFLOP/s of --dtype, for the MFU column (0 = no MFU)")
    p.add_argument("--reduction-factor", type=int, default=None,
                   help="override the adapter methods' reduction factor (e.g. 8 for t5-tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-memory-scheduler", action="store_true",
                   help="compile the train step with XLA:CPU's concurrency-optimised scheduler "
                        "off (it keeps independent work, e.g. every block's dropout RNG, live "
                        "early); no effect on GPU/TPU")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    p.add_argument("--json", default=None, help="output JSON (also .md and .png beside it)")
    p.add_argument("--plot", default=None, help="plot path (default: JSON path with .png)")
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def _child(config_json: str, out: str) -> None:
    from benchmarks.measure import measure
    row = measure(BenchConfig(**json.loads(config_json)))
    Path(out).write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if args.child_config:
        _child(args.child_config, args.child_out)
        return []
    methods = parse_methods(args.methods)
    try:
        base = BenchConfig(model=args.model, batch=args.batch, src_len=args.src_len,
                           tgt_len=args.tgt_len, steps=args.steps, warmup_steps=args.warmup,
                           gen_repeats=args.gen_repeats, dtype=args.dtype, scan=args.scan,
                           remat=args.remat, per_example_dropout=args.per_example_dropout,
                           peak_tflops=args.peak_tflops,
                           reduction_factor=args.reduction_factor, seed=args.seed,
                           cpu_memory_scheduler=args.cpu_memory_scheduler)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    rows = run_all(base, methods, timeout=args.timeout)
    table = report.markdown_table(rows)
    print(table)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")
        path.with_suffix(".md").write_text(table + "\n")
        ok = [r for r in rows if "error" not in r]
        title = (f"{args.model}, batch {args.batch}, {args.src_len}/{args.tgt_len} tokens, "
                 f"{args.dtype}" + (f", {ok[0]['device']}" if ok else ""))
        report.plot(rows, args.plot or path.with_suffix(".png"), title=title)
    return rows


if __name__ == "__main__":
    main()
