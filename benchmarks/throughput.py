"""Real-data training throughput: packed vs padded batches of a task's real training rows.

    python -m benchmarks.throughput --task sst2 --model random:t5-base --method compacter++ \
        --batch 32 --steps 10 [--layouts packed-tight,packed,padded] [--dtype float32|bfloat16] \
        [--json out.json]

Each (task, method, layout) runs in its own subprocess (so peak memory is per run). Layouts:
`padded` (every batch [batch, source_length]), `packed` (one worst-case packed target length,
`plan_packing(tight_targets=False)`) and `packed-tight` (targets packed to the shortest of a
few target buckets that keeps the rows, `tight_targets=True`: what `experiments.finetune`
trains with). Default: packed-tight and padded side by side; `--packing` alone = packed-tight,
`--no-packing` = padded. `--tasks` and `--methods`
take comma-separated lists. What one run does (`measure`):

* data: the paper's train split (`paper_splits`, files source, data seed 42), T5 vocabulary,
  source length 128, the task's target length (`Task.max_target_length`), the task-name prefix
  where the original adds it (`Method.task_prefix`); batches in the recipe's order
  (`train_batches`, seed 42), as `experiments.finetune` feeds them: padded runs fill an
  epoch's partial last batch up with empty rows (`pad_batch`), packed runs pack each batch
  (`plan_packing` over the paper's epochs, so the row and target buckets are the ones a full
  run compiles). Both layouts consume exactly the same examples at every step.
* step: the library's train step (`make_train_step(seq2seq_apply_fn(model), tx,
  merge_fn=method.combine)`), `jax.jit(..., donate_argnums=0)`, compiled ahead of time once
  per distinct batch shape (`compiles` counts distinct (shape, dtype) signatures of the batch;
  an AOT-compiled executable cannot recompile, so nothing else compiles), `compile_time_s`
  per shape (`.lower` + `.compile`, aligned with `compiled_shapes`).
* timing: `warmup` untimed steps, then `steps` timed ones, each ended by
  `block_until_ready`; host batch building (and packing) is done before and timed apart
  (`host_batch_s`). step_time_s = median; examples_per_s = real examples of the timed steps /
  their total time (examples, not rows).
* fill: real source (target) tokens / source (target) slots over the timed steps.
* memory: CPU: the child's peak RSS (`ru_maxrss`, includes compilation) and
  `train_peak_rss_mb` (VmHWM reset after compiling); GPU/TPU: `peak_bytes_in_use`.
* FLOPs: real_model_flops_per_step = 3 x the forward matmul FLOPs of every example at its
  own real lengths (`t5_forward_flops`, the useful work); slot_model_flops_per_step = the same
  for the computed [rows, S] x [rows, T] shape. mfu_real / mfu with `--peak-tflops`.

`--export-batches FILE.npz --num-batches N` writes the first N padded recipe batches instead
(used by `benchmarks/torch_adapters.py` for the same rows in PyTorch).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax.peft import method_names

ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ThroughputConfig:
    """One measurement: one task, one method, one layout (packed or padded to source_length).

    `seed` orders the training rows (the recipe's `train_batches` seed) and initialises the
    method's parameters; `data_seed` draws the paper's splits. `plan_epochs`: epochs the
    packing plan covers (None = the paper's: 20 for small tasks, 3 for large ones).
    `train_samples` keeps the first n training rows (smoke tests). `tight_targets` (packed
    runs): pack targets to the plan's target buckets (else one worst-case target length).
    """

    task: str = "sst2"
    model: str = "random:t5-base"
    method: str = "compacter++"
    packing: bool = True
    tight_targets: bool = True  # packed targets in the plan's target buckets (plan_packing)
    batch: int = 32
    steps: int = 10
    warmup_steps: int = 2
    dtype: str = "float32"
    source_length: int = 128
    seed: int = 42
    data_seed: int = 42
    train_samples: int | None = None
    plan_epochs: int | None = None
    scan: bool = True
    peak_tflops: float = 0.0
    reduction_factor: int | None = None

    def __post_init__(self) -> None:
        for f in ("batch", "steps", "source_length"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup_steps}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.train_samples is not None and self.train_samples < self.batch:
            raise ValueError(f"--train-samples ({self.train_samples}) must be >= --batch "
                             f"({self.batch})")
        if self.plan_epochs is not None and self.plan_epochs < 1:
            raise ValueError(f"--plan-epochs must be >= 1, got {self.plan_epochs}")


# ------------------------------------------------------------------------------- data


def encode_train_split(task_name: str, *, add_prefix: bool, source_length: int = 128,
                       data_seed: int = 42, train_samples: int | None = None, tokenizer=None):
    """The paper's training split of `task_name` (local files), tokenised as the recipe does.

    Returns an `EncodedData`: [N, source_length] sources, [N, T] targets with T the task's
    target length (`Task.max_target_length`, e.g. 3 for SST-2 and RTE).
    """
    from compacter_jax import data as data_lib
    from compacter_jax.tokenizer import load_tokenizer

    task = data_lib.get_task(task_name)
    tokenizer = tokenizer or load_tokenizer()
    splits = data_lib.paper_splits(task, data_lib.make_source("files"), data_seed=data_seed,
                                   train_samples=train_samples)
    return data_lib.encode(task, splits["train"], tokenizer, max_source_length=source_length,
                           max_target_length=task.max_target_length(tokenizer), train=True,
                           add_prefix=add_prefix)


def recipe_batches(encoded, batch_size: int, seed: int, num_batches: int) -> list[dict]:
    """The first `num_batches` batches of `train_batches(encoded, batch_size, seed)` as the
    recipe draws them (crossing into later epochs; an epoch's last batch holds only its
    remaining rows: `pad_batch` or packing gives it the static shape)."""
    from compacter_jax.data import train_batches
    return [b for b, _ in itertools.islice(train_batches(encoded, batch_size, seed=seed),
                                           num_batches)]


def examples_in(batch: dict) -> int:
    """Real examples in a packed (segments) or padded (non-empty rows) batch."""
    if "encoder_segment_ids" in batch:
        return int(np.asarray(batch["encoder_segment_ids"]).max(axis=1).sum())
    return int((np.asarray(batch["attention_mask"]).sum(axis=1) > 0).sum())


def paper_epochs(task_name: str) -> int:
    """Epochs of the paper's recipe: 20 on small tasks, 3 on large ones."""
    from compacter_jax.data import get_task
    return 20 if get_task(task_name).is_small else 3


# ---------------------------------------------------------------------- one measurement

LAYOUTS = {"packed-tight": (True, True), "packed": (True, False), "padded": (False, False)}


def target_packing(row: Row) -> str:
    """How a run packed its targets: "tight" (the plan's target buckets), "one length" (the
    worst-case packed target length) or "–" (padded)."""
    if not row["packing"]:
        return "–"
    return "tight" if row.get("tight_targets") else "one length"



def _signature(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def _machine() -> dict[str, Any]:
    import jax
    from benchmarks.measure import device_description
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "device": device_description(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "jax_version": jax.__version__, "framework": "jax"}


def measure(cfg: ThroughputConfig) -> Row:
    """Runs one measurement in this process; returns its JSON row (module docstring)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.measure import _reset_peak_rss, _rss_mb, t5_forward_flops
    from compacter_jax import peft
    from compacter_jax.data import packing as packing_lib
    from compacter_jax.data import pad_batch, steps_per_epoch
    from compacter_jax.train import (TrainState, make_optimizer, make_train_step,
                                     raise_if_nonfinite, seq2seq_apply_fn)

    load_average = os.getloadavg()[0]  # before this run loads the machine itself
    method = peft.get_method(cfg.method)
    if cfg.reduction_factor and isinstance(method, peft.AdapterMethod):
        method = method.replace(reduction_factor=cfg.reduction_factor)
    if cfg.packing and not method.packable:
        raise ValueError(f"method {cfg.method!r} does not support packed rows; run it with "
                         "--no-packing")
    encoded = encode_train_split(cfg.task, add_prefix=method.task_prefix,
                                 source_length=cfg.source_length, data_seed=cfg.data_seed,
                                 train_samples=cfg.train_samples)
    num_batches = cfg.warmup_steps + cfg.steps
    t0 = time.perf_counter()
    plan = None
    if cfg.packing:
        per_epoch = steps_per_epoch(len(encoded), cfg.batch)
        epochs = max(cfg.plan_epochs or paper_epochs(cfg.task), -(-num_batches // per_epoch))
        plan = packing_lib.plan_packing(encoded, cfg.batch, seed=cfg.seed, num_epochs=epochs,
                                        tight_targets=cfg.tight_targets)
    plan_time = time.perf_counter() - t0

    recipe = recipe_batches(encoded, cfg.batch, cfg.seed, num_batches)  # as train_batches
    host_batches, host_s = [], []
    for b in recipe:
        t0 = time.perf_counter()
        host_batches.append(plan.pack(b) if plan else pad_batch(b, cfg.batch))
        host_s.append(time.perf_counter() - t0)

    scanned = cfg.scan and method.hooks().uniform_over_layers()
    model, params = peft.from_pretrained(cfg.model, method, rng=jax.random.PRNGKey(cfg.seed),
                                         dtype=cfg.dtype, scan_layers=scanned)
    trainable, frozen = method.partition(params)
    del params
    n_trainable, n_frozen = peft.count(trainable), peft.count(frozen)
    tx, schedule = make_optimizer(method.learning_rate, 0, 10_000)
    state = TrainState.create(trainable, tx, cfg.seed)
    del trainable  # owned by the state now (donated every step)
    step = jax.jit(make_train_step(seq2seq_apply_fn(model), tx, merge_fn=method.combine,
                                   schedule=schedule), donate_argnums=(0,))
    device_batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in host_batches]

    compiled, shapes, compile_s, first_use = {}, [], [], []
    for i, batch in enumerate(device_batches):
        sig = _signature(batch)
        if sig not in compiled:
            t0 = time.perf_counter()
            compiled[sig] = step.lower(state, frozen, batch).compile()
            compile_s.append(time.perf_counter() - t0)
            shapes.append([int(batch["input_ids"].shape[0]), int(batch["input_ids"].shape[1]),
                           int(batch["labels"].shape[1])])
            first_use.append(i)
    peak_reset = _reset_peak_rss()

    history, times, cpu = [], [], []
    for i, batch in enumerate(device_batches):
        c0, t0 = time.process_time(), time.perf_counter()
        state, metrics = compiled[_signature(batch)](state, frozen, batch)
        jax.block_until_ready(metrics)
        if i >= cfg.warmup_steps:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        history.append((i, metrics))
    raise_if_nonfinite(history)  # a throughput of NaN training is no result
    losses = [float(np.asarray(m["loss"])) for _, m in history[cfg.warmup_steps:]]
    train_peak = _rss_mb("VmHWM") if peak_reset else None

    timed = slice(cfg.warmup_steps, None)
    fills = [packing_lib.fill(b) for b in host_batches[timed]]
    total = {k: sum(f[k] for f in fills) for k in fills[0]}
    examples = [examples_in(b) for b in host_batches[timed]]
    if examples != [examples_in(b) for b in recipe[timed]]:
        raise AssertionError("packing changed the examples of a step")  # packing's contract
    real_flops = [3 * sum(t5_forward_flops(model.config, 1, int(s), int(t)) for s, t in zip(
        b["attention_mask"].sum(axis=1), b["decoder_attention_mask"].sum(axis=1)))
        for b in recipe[timed]]
    slot_flops = [3 * t5_forward_flops(model.config, b["input_ids"].shape[0],
                                       b["input_ids"].shape[1], b["labels"].shape[1])
                  for b in host_batches[timed]]
    wall = sum(times)
    dev = jax.devices()[0]
    peak_device = (dev.memory_stats() or {}).get("peak_bytes_in_use") \
        if dev.platform != "cpu" else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    peak = lambda flops: (sum(flops) / wall / (cfg.peak_tflops * 1e12)  # noqa: E731
                          if cfg.peak_tflops > 0 else None)
    return {
        "task": cfg.task, "method": cfg.method, "model": cfg.model, "packing": cfg.packing,
        "layout": "packed" if cfg.packing else f"padded to {cfg.source_length}",
        "tight_targets": cfg.tight_targets if cfg.packing else None,
        "batch": cfg.batch, "steps": cfg.steps, "warmup_steps": cfg.warmup_steps,
        "dtype": cfg.dtype, "scanned": scanned, "seed": cfg.seed, "data_seed": cfg.data_seed,
        "add_prefix": method.task_prefix, "train_rows": len(encoded),
        "source_length": cfg.source_length, "target_length": int(encoded.labels.shape[1]),
        "packing_plan": dataclasses.asdict(plan) if plan else None,
        "plan_time_s": plan_time if plan else None,
        "trainable_params": n_trainable, "total_params": n_trainable + n_frozen,
        "examples_per_s": sum(examples) / wall,
        "tokens_per_s": (total["source_tokens"] + total["target_tokens"]) / wall,
        "step_time_s": statistics.median(times), "step_times_s": times,
        "step_cpu_s": statistics.median(cpu),
        "examples_per_step": examples,
        "rows_per_step": [int(b["input_ids"].shape[0]) for b in host_batches[timed]],
        "source_fill": total["source_tokens"] / total["source_slots"],
        "target_fill": total["target_tokens"] / total["target_slots"],
        **{f"timed_{k}": v for k, v in total.items()},
        "host_batch_s": statistics.median(host_s),
        "peak_memory_mb": peak_device / 2**20 if peak_device is not None else peak_rss,
        "peak_memory_kind": "device_peak_bytes" if peak_device is not None else "host_peak_rss",
        "host_peak_rss_mb": peak_rss, "train_peak_rss_mb": train_peak,
        "compiles": len(compiled),
        "compiles_counted_by": "distinct (shape, dtype) batch signatures, each compiled once "
                               "ahead of time (jit(...).lower(...).compile())",
        "compiled_shapes": shapes, "compiled_shapes_layout": "[rows, source_len, target_len]",
        "compile_time_s": compile_s, "compile_first_step": first_use,
        "real_model_flops_per_step": statistics.mean(real_flops),
        "slot_model_flops_per_step": statistics.mean(slot_flops),
        "real_tflops_per_s": sum(real_flops) / wall / 1e12,
        "mfu_real": peak(real_flops), "mfu": peak(slot_flops),
        "peak_tflops": cfg.peak_tflops or None,
        "losses": losses, "final_loss": losses[-1],
        **_machine(), "load_average_1m": load_average,
    }


def export_batches(cfg: ThroughputConfig, num_batches: int, path: str | Path) -> None:
    """Writes the first `num_batches` padded recipe batches of `cfg` to `path` (.npz).

    Arrays: input_ids, attention_mask [N, B, S]; labels, decoder_attention_mask [N, B, T]
    (int32, right-padded with 0; a partial batch is filled up with empty rows, `pad_batch`);
    num_examples [N] (real rows of each batch, first in the batch); with a `random:<preset>`
    model also the model FLOPs per batch (float64 [N], 3 x forward, as `measure`): flops_real
    (each example at its real lengths), flops_longest (its rows padded to the batch's longest
    source and target) and flops_max_length (its rows at [S] x [T]). `meta`: a JSON string of
    the provenance (task, method, seeds, ...).
    """
    from benchmarks.measure import t5_forward_flops
    from compacter_jax import peft
    from compacter_jax.data import pad_batch
    from compacter_jax.models import get_preset
    from compacter_jax.paths import t5_vocab_dir

    add_prefix = peft.get_method(cfg.method).task_prefix
    encoded = encode_train_split(cfg.task, add_prefix=add_prefix,
                                 source_length=cfg.source_length, data_seed=cfg.data_seed,
                                 train_samples=cfg.train_samples)
    batches = recipe_batches(encoded, cfg.batch, cfg.seed, num_batches)
    keys = ("input_ids", "attention_mask", "labels", "decoder_attention_mask")
    arrays = {k: np.stack([pad_batch(b, cfg.batch)[k] for b in batches]) for k in keys}
    arrays["num_examples"] = np.array([len(b["input_ids"]) for b in batches])
    if cfg.model.startswith("random:"):
        t5 = get_preset(cfg.model.split(":", 1)[1])
        flops = lambda b, s, t: 3.0 * t5_forward_flops(t5, b, int(s), int(t))  # noqa: E731
        src, tgt = arrays["attention_mask"].sum(-1), arrays["decoder_attention_mask"].sum(-1)
        arrays["flops_real"] = np.array([sum(flops(1, s, t) for s, t in zip(ss, tt))
                                         for ss, tt in zip(src, tgt)])
        arrays["flops_longest"] = np.array([flops(n, ss.max(), tt.max()) for n, ss, tt
                                            in zip(arrays["num_examples"], src, tgt)])
        width = arrays["labels"].shape[-1]
        arrays["flops_max_length"] = np.array([flops(n, cfg.source_length, width)
                                               for n in arrays["num_examples"]])
    meta = {"task": cfg.task, "method": cfg.method, "model": cfg.model,
            "add_prefix": add_prefix, "batch": cfg.batch, "seed": cfg.seed,
            "data_seed": cfg.data_seed, "train_rows": len(encoded),
            "train_samples": cfg.train_samples, "source_length": cfg.source_length,
            "target_length": int(encoded.labels.shape[1]), "vocab_dir": str(t5_vocab_dir())}
    np.savez(path, meta=json.dumps(meta), **arrays)


# ------------------------------------------------------------------------ orchestration


def run_child(cfg: ThroughputConfig, timeout: float | None = None) -> Row:
    """`measure(cfg)` in a fresh Python process; a failure becomes a row with `error`."""
    ident = {"task": cfg.task, "method": cfg.method, "packing": cfg.packing,
             "tight_targets": cfg.tight_targets if cfg.packing else None}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--child-config",
               json.dumps(dataclasses.asdict(cfg)), "--child-out", str(out)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**ident, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {**ident, "error": f"exit {proc.returncode}: " + " / ".join(tail)}
        row = json.loads(out.read_text())
        row["child_wall_s"] = time.perf_counter() - start
        return row


def markdown_table(rows: list[Row]) -> str:
    """One line per run; `vs padded` = examples/s over the padded run of the same task/method;
    `packed targets`: tight or one length (`target_packing`)."""
    head = ("| task | method | layout | rows/step | source fill | target fill | step (s) | "
            "step CPU-s | examples/s | vs padded | peak mem (MB) | compiles | compile (s) | "
            "packed targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    padded = {(r["task"], r["method"]): r for r in rows
              if "error" not in r and not r["packing"]}
    for r in rows:
        layout = "packed" if r["packing"] else "padded"
        if "error" in r:
            lines.append(f"| {r['task']} | {r['method']} | {layout} | failed: "
                         f"{r['error'][:80]} |" + " |" * 10)
            continue
        ref = padded.get((r["task"], r["method"]))
        ratio = f"{r['examples_per_s'] / ref['examples_per_s']:.2f}x" if ref else "–"
        lines.append(
            f"| {r['task']} | {r['method']} | {layout} | "
            f"{statistics.mean(r['rows_per_step']):.1f} | {r['source_fill']:.2f} | "
            f"{r['target_fill']:.2f} | {r['step_time_s']:.3f} | {r['step_cpu_s']:.2f} | "
            f"{r['examples_per_s']:.1f} | {ratio} | {r['peak_memory_mb']:.0f} | "
            f"{r['compiles']} | {' + '.join(f'{c:.1f}' for c in r['compile_time_s'])} | "
            f"{target_packing(r)} |")
    return "\n".join(lines)


def _names(text: str, valid: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"{option}: unknown {bad or text!r}; choose from {', '.join(valid)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", "--tasks", dest="tasks", default="sst2",
                   help="comma-separated tasks (local files)")
    p.add_argument("--method", "--methods", dest="methods", default="compacter++",
                   help="comma-separated PEFT presets")
    p.add_argument("--model", default="random:t5-base",
                   help="checkpoint dir, cached Hub id or random:<preset>")
    p.add_argument("--layouts", default=None,
                   help="comma-separated layouts, measured side by side: " + ", ".join(LAYOUTS)
                   + " (default: packed-tight,padded)")
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="packed-tight rows only / padded rows only (shorthands of --layouts)")
    p.add_argument("--batch", type=int, default=32, help="examples per step")
    p.add_argument("--steps", type=int, default=10, help="timed train steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute dtype (parameters stay float32)")
    p.add_argument("--source-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42, help="training seed (data order)")
    p.add_argument("--data-seed", type=int, default=42, help="paper-split seed")
    p.add_argument("--train-samples", type=int, default=None,
                   help="keep the first n training rows (smoke tests)")
    p.add_argument("--plan-epochs", type=int, default=None,
                   help="epochs the packing plan covers (default: the paper's)")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                   help="scan over layers where the method allows it")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="device peak TFLOP/s of --dtype, for mfu / mfu_real (0 = none)")
    p.add_argument("--reduction-factor", type=int, default=None,
                   help="override the adapter methods' reduction factor (e.g. 8 for t5-tiny)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--json", default=None, help="output JSON (also .md beside it)")
    p.add_argument("--export-batches", default=None, help="write padded batches (.npz), exit")
    p.add_argument("--num-batches", type=int, default=None, help="batches for --export-batches")
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    args = build_parser().parse_args(argv)
    if args.child_config:
        row = measure(ThroughputConfig(**json.loads(args.child_config)))
        Path(args.child_out).write_text(json.dumps(row))
        return [row]
    from compacter_jax.data import task_names
    tasks = _names(args.tasks, task_names(), "--tasks")
    methods = _names(args.methods, method_names(), "--methods")
    if args.layouts is not None and args.packing is not None:
        raise SystemExit("--layouts and --packing/--no-packing both given; use --layouts")
    if args.layouts is not None:
        layouts = _names(args.layouts, tuple(LAYOUTS), "--layouts")
    else:
        layouts = (["packed-tight", "padded"] if args.packing is None
                   else ["packed-tight" if args.packing else "padded"])
    try:
        base = ThroughputConfig(
            task=tasks[0], model=args.model, method=methods[0], batch=args.batch,
            steps=args.steps, warmup_steps=args.warmup, dtype=args.dtype,
            source_length=args.source_length, seed=args.seed, data_seed=args.data_seed,
            train_samples=args.train_samples, plan_epochs=args.plan_epochs, scan=args.scan,
            peak_tflops=args.peak_tflops, reduction_factor=args.reduction_factor)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.export_batches:
        if len(tasks) != 1 or len(methods) != 1 or not args.num_batches:
            raise SystemExit("--export-batches needs one --task, one --method and --num-batches")
        export_batches(base, args.num_batches, args.export_batches)
        return []
    rows = []
    for task, method, layout in itertools.product(tasks, methods, layouts):
        packing, tight = LAYOUTS[layout]
        row = run_child(dataclasses.replace(base, task=task, method=method, packing=packing,
                                            tight_targets=tight), timeout=args.timeout)
        rows.append(row)
        tag = f"[{task} {method} {layout}]"
        if "error" in row:
            print(f"{tag} FAILED: {row['error']}", flush=True)
        else:
            print(f"{tag} {row['examples_per_s']:.2f} examples/s, step {row['step_time_s']:.3f}"
                  f" s, source fill {row['source_fill']:.2f}, target fill "
                  f"{row['target_fill']:.2f}, {row['compiles']} compile(s), peak "
                  f"{row['peak_memory_mb']:.0f} MB (child {row['child_wall_s']:.0f} s)",
                  flush=True)
    table = markdown_table(rows)
    print(table)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")
        path.with_suffix(".md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
