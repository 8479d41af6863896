"""The cost of differential privacy: train-step time and peak memory of the DP step
(`compacter_jax.train.dp`: per-example gradients by vmap, clipping, noise) against the plain
step, for Compacter++ and LoRA (or any presets), each (method, mode) in its own subprocess so
that peak memories do not mix.

    python -m benchmarks.dp --model random:t5-base --methods compacter++,lora \
        --batch 32 --src-len 128 --tgt-len 4 --steps 10 --json benchmarks/results/dp.json

Rows (JSON list): method, mode ("non_dp" / "dp"), step_time_s (median of `--steps` timed
steps after `--warmup`), step_times_s, peak_memory_mb (accelerators: the device's
peak_bytes_in_use; CPU: the peak RSS of the timed steps, VmHWM reset after compilation),
compile_time_s, device. The summary adds dp_over_non_dp (step time and memory ratios) per
method. `--microbatch` bounds the DP step's memory (examples per sequential vmap chunk). The
non-DP baseline uses one dropout key per step (the default of experiments/configs/glue.py);
`--per-example-dropout` makes it vmap over examples too, isolating the cost of per-example
gradients.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("non_dp", "dp")


@dataclasses.dataclass(frozen=True)
class DPBench:
    model: str = "random:t5-base"
    method: str = "compacter++"
    mode: str = "dp"
    batch: int = 32
    src_len: int = 128
    tgt_len: int = 4
    steps: int = 10
    warmup: int = 2
    microbatch: int = 0
    per_example_dropout: bool = False
    reduction_factor: int | None = None
    seed: int = 0


def measure(cfg: DPBench) -> dict[str, Any]:
    """One (method, mode) in this process; returns its row."""
    import jax
    import jax.numpy as jnp

    from benchmarks.measure import (_reset_peak_rss, _rss_mb, _timed, device_description,
                                    make_batch)
    from compacter_jax import peft
    from compacter_jax.train import TrainState, make_optimizer, make_train_step
    from compacter_jax.train import seq2seq_apply_fn
    from compacter_jax.train.dp import make_dp_train_step

    method = peft.get_method(cfg.method)
    if cfg.reduction_factor and isinstance(method, peft.AdapterMethod):
        method = method.replace(reduction_factor=cfg.reduction_factor)
    scan = method.hooks().uniform_over_layers()
    model, params = peft.from_pretrained(cfg.model, method, rng=jax.random.PRNGKey(cfg.seed),
                                         scan_layers=scan)
    trainable, frozen = method.partition(params)
    del params
    apply_fn = seq2seq_apply_fn(model)
    if cfg.mode == "dp":
        tx, schedule = make_optimizer(method.learning_rate, 0, 10_000, clip_norm=None)
        step = make_dp_train_step(apply_fn, tx, merge_fn=method.combine, clip_norm=1.0,
                                  noise_multiplier=1.0, expected_batch_size=cfg.batch,
                                  schedule=schedule, microbatch_size=cfg.microbatch or None)
    else:
        tx, schedule = make_optimizer(method.learning_rate, 0, 10_000)
        step = make_train_step(apply_fn, tx, merge_fn=method.combine, schedule=schedule,
                               per_example_dropout=cfg.per_example_dropout)
    state = TrainState.create(trainable, tx, cfg.seed)
    del trainable
    batch = {k: jnp.asarray(v) for k, v in make_batch(cfg.batch, cfg.src_len, cfg.tgt_len,
                                                        model.config.vocab_size, cfg.seed).items()}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    compile_time = time.perf_counter() - t0
    peak_reset = _reset_peak_rss()

    def one_step():
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        return state, metrics

    _timed(one_step, cfg.warmup)
    times = _timed(one_step, cfg.steps)
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        peak, kind = (dev.memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20, "device"
    else:
        peak, kind = (_rss_mb("VmHWM") if peak_reset else None), "host_rss_timed_steps"
    return {**dataclasses.asdict(cfg), "step_time_s": statistics.median(times),
            "step_times_s": times, "examples_per_s": cfg.batch / statistics.median(times),
            "peak_memory_mb": peak, "peak_memory_kind": kind, "compile_time_s": compile_time,
            "device": device_description(), "jax_version": jax.__version__}


def run_child(cfg: DPBench, timeout: float) -> dict[str, Any]:
    """`measure(cfg)` in a fresh process; a failure becomes a row with `error`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.dp", "--child-config",
               json.dumps(dataclasses.asdict(cfg)), "--child-out", str(out)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**dataclasses.asdict(cfg), "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {**dataclasses.asdict(cfg), "error": f"exit {proc.returncode}: "
                    + " / ".join(tail)}
        return json.loads(out.read_text())


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per method: DP step time and peak memory over the non-DP step's."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        by = {r["mode"]: r for r in rows if r["method"] == method and "error" not in r}
        if set(by) == set(MODES):
            mem = (by["dp"]["peak_memory_mb"] / by["non_dp"]["peak_memory_mb"]
                   if by["dp"]["peak_memory_mb"] and by["non_dp"]["peak_memory_mb"] else None)
            out[method] = {"step_time": by["dp"]["step_time_s"] / by["non_dp"]["step_time_s"],
                           "peak_memory": mem}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:t5-base")
    p.add_argument("--methods", default="compacter++,lora")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--microbatch", type=int, default=0, help="DP: examples per vmap chunk")
    p.add_argument("--per-example-dropout", action="store_true")
    p.add_argument("--reduction-factor", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_config:
        row = measure(DPBench(**json.loads(args.child_config)))
        Path(args.child_out).write_text(json.dumps(row))
        return row
    for name in ("batch", "src_len", "tgt_len", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for mode in MODES:
            cfg = DPBench(model=args.model, method=method, mode=mode, batch=args.batch,
                          src_len=args.src_len, tgt_len=args.tgt_len, steps=args.steps,
                          warmup=args.warmup, microbatch=args.microbatch,
                          per_example_dropout=args.per_example_dropout,
                          reduction_factor=args.reduction_factor)
            rows.append(run_child(cfg, args.timeout))
            r = rows[-1]
            print(f"{method:12s} {mode:7s} " + (r["error"] if "error" in r else
                  f"{r['step_time_s'] * 1e3:9.1f} ms/step  peak {r['peak_memory_mb']} MB"),
                  flush=True)
    result = {"rows": rows, "dp_over_non_dp": ratios(rows)}
    print(json.dumps(result["dp_over_non_dp"], indent=1))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
