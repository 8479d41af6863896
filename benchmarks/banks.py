"""Serving K adapters on one backbone: mixed-task batches (an adapter bank) against one batch
per task in turn (the plain model, its adapter swapped between batches), side by side.

    python -m benchmarks.banks --model random:t5-base --method compacter++ --tasks 1,4,16 \
        --batch 8 --src-len 64 --new-tokens 4 --repeats 3 --json banks.json

For each K, both modes decode the same K x batch examples with greedy decoding and the KV
cache (`eos` disabled, so every batch decodes exactly `--new-tokens` tokens):

* mixed: K batches whose rows draw their task uniformly at random
  (`peft.bank.bank_greedy_generate`: each row gathers its adapter);
* per_task: K batches of one task each (`models.greedy_generate` with
  `method.combine(adapter_k, frozen)`), i.e. what serving without a bank does once requests
  have been grouped by task.

Reported per (K, mode), medians over the batches of `--repeats` passes after one warm-up
pass:
latency_s (per batch) and examples_per_s (batch / latency_s), pass_s (the K batches),
compile_s (lowering and compiling the decoder once); and memory:
adapter_mb (one adapter's float32 parameters), bank_mb (K of them, the memory the bank adds
to the frozen backbone), temp_mb (XLA's scratch of the compiled decoder,
`memory_analysis().temp_size_in_bytes`: the mixed program also holds the gathered
batch x adapter copy), and on accelerators peak_mb (`memory_stats`). mixed/per_task at K = 1
is the cost of the vmap itself (the frozen matmuls stay plain matmuls; see peft/bank.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax import peft
from compacter_jax.models import greedy_generate
from compacter_jax.models.generation import _compiled as compiled_greedy
from compacter_jax.peft import bank as bank_lib

MB = 1 << 20


def _bytes(tree: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def _adapters(trainable: Any, k: int, seed: int) -> list[Any]:
    """K distinct adapters (the init plus noise), as trained ones would be."""
    out = []
    for i in range(k):
        keys = iter(jax.random.split(jax.random.PRNGKey(seed + i), 10_000))
        out.append(jax.tree_util.tree_map(
            lambda x: x + 0.01 * jax.random.normal(next(keys), x.shape, x.dtype), trainable))
    return out


def _inputs(batch: int, src_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(seed)
    ids = rs.randint(2, vocab, (batch, src_len)).astype(np.int32)
    return ids, np.ones_like(ids)


def _peak_mb() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / MB


def _timed_passes(run_batch, num_batches: int, repeats: int) -> tuple[float, list[float],
                                                                      list[float]]:
    """(warm-up pass seconds, per-pass seconds, per-batch latencies) of `run_batch(b)`."""
    start = time.perf_counter()
    for b in range(num_batches):
        jax.block_until_ready(run_batch(b))
    first = time.perf_counter() - start
    passes, latencies = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in range(num_batches):
            t = time.perf_counter()
            jax.block_until_ready(run_batch(b))
            latencies.append(time.perf_counter() - t)
        passes.append(time.perf_counter() - start)
    return first, passes, latencies


def measure(model, method, trainable, frozen, k: int, args) -> list[dict[str, Any]]:
    """The two rows (mixed, per_task) for K = k adapters."""
    adapters = _adapters(trainable, k, args.seed)
    bank = bank_lib.stack_adapters(adapters)
    rs = np.random.RandomState(args.seed)
    inputs = [_inputs(args.batch, args.src_len, model.config.vocab_size, args.seed + b)
              for b in range(k)]
    mixed_tasks = [rs.randint(0, k, args.batch).astype(np.int32) for _ in range(k)]
    per_task = [method.combine(a, frozen) for a in adapters]
    eos = -1  # never produced: every batch decodes exactly new_tokens tokens

    def mixed(b):
        ids, mask = inputs[b]
        return bank_lib.bank_greedy_generate(model, method, bank, frozen, mixed_tasks[b], ids,
                                             mask, args.new_tokens, eos_id=eos)

    def plain(b):
        ids, mask = inputs[b]
        return greedy_generate(model, per_task[b], ids, mask, args.new_tokens, eos_id=eos)

    ids, mask = (jnp.asarray(x) for x in inputs[0])
    lowered = {
        "mixed": lambda: bank_lib._compiled_generate(model, method, args.new_tokens, eos).lower(
            bank, frozen, jnp.asarray(mixed_tasks[0]), ids, mask),
        "per_task": lambda: compiled_greedy(model, args.new_tokens, eos).lower(
            per_task[0], ids, mask),
    }
    compile_s, temp = {}, {}
    for mode, lower in lowered.items():  # also fills the compilation cache the calls use
        start = time.perf_counter()
        temp[mode] = lower().compile().memory_analysis()
        compile_s[mode] = time.perf_counter() - start
    rows = []
    for mode, fn in (("mixed", mixed), ("per_task", plain)):
        _, passes, latencies = _timed_passes(fn, k, args.repeats)
        pass_s = statistics.median(passes)
        analysis = temp[mode]
        rows.append({
            "adapters": k, "mode": mode, "batch": args.batch, "batches": k,
            # From the median batch: robust to the odd slow batch on a shared machine.
            "examples_per_s": args.batch / statistics.median(latencies), "pass_s": pass_s,
            "latency_s": statistics.median(latencies),
            "latency_min_s": min(latencies), "latency_max_s": max(latencies),
            "compile_s": compile_s[mode],
            "adapter_mb": _bytes(adapters[0]) / MB,
            "bank_mb": _bytes(bank) / MB if mode == "mixed" else 0.0,
            "per_task_params_mb": _bytes(per_task[0]) / MB if mode == "per_task" else None,
            "temp_mb": None if analysis is None else analysis.temp_size_in_bytes / MB,
            "peak_mb": _peak_mb(),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| K | mode | examples/s | latency per batch (s) | compile (s) | bank (MB) | "
            "XLA temp (MB) | mixed / per-task latency |")
    lines = [head, "|" + "---:|" * 8]
    by_k = {}
    for r in rows:
        by_k.setdefault(r["adapters"], {})[r["mode"]] = r
    for k, modes in sorted(by_k.items()):
        ratio = modes["mixed"]["latency_s"] / modes["per_task"]["latency_s"]
        for mode in ("mixed", "per_task"):
            r = modes[mode]
            temp = "—" if r["temp_mb"] is None else f"{r['temp_mb']:.1f}"
            lines.append(f"| {k} | {mode} | {r['examples_per_s']:.2f} | {r['latency_s']:.3f} | "
                         f"{r['compile_s']:.1f} | {r['bank_mb']:.2f} | {temp} | "
                         f"{f'{ratio:.2f}x' if mode == 'mixed' else ''} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:t5-base")
    p.add_argument("--method", default="compacter++")
    p.add_argument("--tasks", default="1,4,16", help="numbers of adapters K")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--reduction-factor", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="output JSON (a .md table is written beside)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    ks = sorted({int(k) for k in args.tasks.split(",") if k.strip()})
    if not ks or ks[0] < 1 or args.batch < 1 or args.repeats < 1 or args.new_tokens < 1:
        raise SystemExit("--tasks, --batch, --repeats and --new-tokens must be >= 1")
    overrides = {} if args.reduction_factor is None else {"reduction_factor":
                                                          args.reduction_factor}
    method = peft.get_method(args.method, **overrides)
    bank_lib.check_bankable(method)
    scan = args.scan and method.hooks().uniform_over_layers()
    start = time.perf_counter()
    model, params = peft.from_pretrained(args.model, method, dtype=args.dtype, scan_layers=scan)
    trainable, frozen = method.partition(params)
    del params
    load_s = time.perf_counter() - start
    rows = []
    for k in ks:
        rows += measure(model, method, trainable, frozen, k, args)
        print(f"K={k}: " + ", ".join(f"{r['mode']} {r['examples_per_s']:.2f} ex/s"
                                     for r in rows[-2:]), flush=True)
    result = {
        "config": {**vars(args), "scan": scan}, "rows": rows,
        "trainable_params": peft.count(trainable), "frozen_mb": _bytes(frozen) / MB,
        "load_s": load_s, "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "cpu": platform.processor() or platform.machine(), "jax": jax.__version__,
    }
    table = markdown(rows)
    print(table)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        path.with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
