"""Fastfood / Intrinsic-SAID cost on a T5: the transform, the constants, a forward, a gradient.

    python -m benchmarks.fastfood --model t5-base --repeats 3 --json out.json
    python -m benchmarks.fastfood --model t5-tiny --repeats 1 --no-fwht   # quick smoke run

Sections (all in this process, in this order):

* fwht: each transform variant on [rows, L] float32 arrays with rows * L = 2**25 (the T5
  embedding pads to L = 2**25; the T5-base FFN kernels to 2**22, attention to 2**20): compile
  time and median wall time of `--repeats` calls. `blocked-b{k}` is the library's transform
  with k-bit dense Hadamard blocks (`compacter_jax.peft.fastfood._fwht`; the library uses
  FWHT_BLOCK_BITS); `butterfly` a radix-2 butterfly per bit ([A, 2, C] view, a+b / a-b);
  `constant-geometry` the radix-2 stage x -> [x_even + x_odd, x_even - x_odd] repeated.
* intrinsic: the backbone shapes from `jax.eval_shape` of the model's init, real (random)
  theta0 arrays, `init_intrinsic` (time; bytes of the constants, per (L, D) group), then
  jit-compiled `intrinsic_params` forward and the gradient w.r.t. the trainable tree of
  sum(all parameters): compile time, median wall and process-CPU seconds, peak RSS (VmHWM,
  reset before each phase; includes theta0 and the constants, which stay resident).
* train_step (`--train-step`): one AdamW step of the T5 through `intrinsic_params`
  (`make_train_step(merge_fn=...)`, batch 8 x 128 -> 8 tokens).

Timings on a shared machine move with other processes; CPU seconds are reported beside wall.
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

from compacter_jax.models import T5ForConditionalGeneration, get_preset, init_params, stack_blocks
from compacter_jax.peft import fastfood as ff


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _timed(fn, repeats: int, *args) -> dict[str, float]:
    """Median wall and process-CPU seconds of `repeats` calls fn(*args) (after compilation)."""
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
            "wall_all_s": [round(w, 4) for w in wall]}


def _compile(fn, *args):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


# ----------------------------------------------------------------------------- fwht variants


def _butterfly(x):
    length = x.shape[-1]
    rows = x.reshape(-1, length)
    for bit in range(length.bit_length() - 1):
        y = rows.reshape(rows.shape[0], length >> (bit + 1), 2, 1 << bit)
        a, b = y[:, :, 0], y[:, :, 1]
        rows = jnp.stack([a + b, a - b], axis=2).reshape(rows.shape)
    return rows.reshape(x.shape)


def _constant_geometry(x):
    length = x.shape[-1]
    for _ in range(length.bit_length() - 1):
        y = x.reshape(x.shape[:-1] + (length // 2, 2))
        x = jnp.concatenate([y[..., 0] + y[..., 1], y[..., 0] - y[..., 1]], axis=-1)
    return x


def fwht_variants(sizes: list[tuple[int, int]], repeats: int, block_bits: list[int]) -> list:
    variants = {f"blocked-b{b}": (lambda b: lambda x: ff._fwht(x, b))(b) for b in block_bits}
    variants["butterfly"] = _butterfly
    variants["constant-geometry"] = _constant_geometry
    rows_out = []
    for bits, rows in sizes:
        x = jax.random.normal(jax.random.key(bits), (rows, 1 << bits), jnp.float32)
        reference = None
        for name, fn in variants.items():
            compiled, compile_s = _compile(fn, x)
            y = compiled(x)
            reference = y if reference is None else reference
            err = float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))
            row = {"variant": name, "L": 1 << bits, "rows": rows, "compile_s": compile_s,
                   "max_rel_diff": err, **_timed(compiled, repeats, x)}
            rows_out.append(row)
            print(f"fwht [{rows}, 2^{bits}] {name:18s} {row['wall_s'] * 1e3:8.1f} ms "
                  f"(cpu {row['cpu_s'] * 1e3:7.1f} ms, compile {compile_s:.1f} s)", flush=True)
            del y
        del x, reference
    return rows_out


# ----------------------------------------------------------------------------- intrinsic


def _model_and_shapes(preset: str, scan: bool):
    model = T5ForConditionalGeneration(get_preset(preset))
    ids = jnp.zeros((1, 2), jnp.int32)
    abstract = jax.eval_shape(lambda k: model.init(k, ids, jnp.ones_like(ids), ids)["params"],
                              jax.random.key(0))
    if scan:
        abstract = jax.eval_shape(stack_blocks, abstract)
    return model, abstract


def intrinsic(args) -> dict[str, Any]:
    model, abstract = _model_and_shapes(args.model, False)
    shapes = ff.param_shapes(abstract)
    theta0 = init_params(model, jax.random.key(args.seed))  # real (random) backbone arrays
    if args.scan:
        theta0 = stack_blocks(theta0)
        shapes = ff.param_shapes(jax.eval_shape(stack_blocks, abstract))
    out: dict[str, Any] = {"backbone_params": int(sum(np.prod(s) for s in shapes.values())),
                           "rss_after_theta0_mb": _status_mb("VmRSS")}

    _reset_peak()
    t0 = time.perf_counter()
    trainable, constants = ff.init_intrinsic(jax.random.key(args.seed), shapes,
                                             args.intrinsic_dim, said=args.said)
    jax.block_until_ready(constants)
    layout = constants.layout
    out.update({
        "init_constants_s": time.perf_counter() - t0,
        "init_peak_rss_mb": _status_mb("VmHWM"),
        "tensors": len(layout.tensors), "vector_size": layout.vector_size,
        "said_size": layout.said_size, "trainable": layout.trainable_count,
        "constants_bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(constants))),
        "padded_entries": int(sum(c.signs.size for c in constants.groups)),
        "groups": [{"L": length, "D": size, "rows": int(c.signs.shape[0]),
                    "bytes": int(sum(x.nbytes for x in jax.tree_util.tree_leaves(c)))}
                   for (length, size), c in zip(layout.groups, constants.groups)],
        "rss_after_constants_mb": _status_mb("VmRSS"),
    })
    print(f"{layout.trainable_count} trainable ({layout.vector_size} + {layout.said_size}) over "
          f"{len(layout.tensors)} tensors; constants {out['constants_bytes'] / 2**30:.2f} GiB, "
          f"drawn in {out['init_constants_s']:.1f} s", flush=True)
    trainable = {k: v + 0.01 * jax.random.normal(jax.random.key(1), v.shape)
                 for k, v in trainable.items()}
    chunk = args.max_chunk_elements

    def forward(t, p, c):
        return ff.intrinsic_params(t, p, c, max_chunk_elements=chunk)

    def loss(t, p, c):
        return sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(forward(t, p, c)))

    for name, fn in (("forward", forward), ("grad", jax.grad(loss))):
        compiled, compile_s = _compile(fn, trainable, theta0, constants)
        _reset_peak()
        timing = _timed(compiled, args.repeats, trainable, theta0, constants)
        out[name] = {"compile_s": compile_s, "peak_rss_mb": _status_mb("VmHWM"), **timing}
        print(f"intrinsic_params {name:8s} {timing['wall_s']:7.2f} s (cpu {timing['cpu_s']:.2f} s, "
              f"compile {compile_s:.1f} s, peak RSS {out[name]['peak_rss_mb']:.0f} MB)", flush=True)
        del compiled
    if args.train_step:
        out["train_step"] = train_step(args, model, trainable, theta0, constants)
    return out


def train_step(args, model, trainable, theta0, constants) -> dict[str, Any]:
    from compacter_jax.train import TrainState, make_optimizer, make_train_step, seq2seq_apply_fn

    tx, schedule = make_optimizer(3e-2, 0, 10_000)
    chunk = args.max_chunk_elements

    def merge(t, frozen):
        return ff.intrinsic_params(t, frozen["theta0"], frozen["constants"],
                                   max_chunk_elements=chunk)

    # One dropout key for the batch: per-example dropout vmaps the T5 over examples and, as
    # every backbone weight is differentiated here, would hold per-example weight gradients.
    step = make_train_step(seq2seq_apply_fn(model.clone(config=model.config.replace(
        scan_layers=args.scan))), tx, merge_fn=merge, schedule=schedule,
        per_example_dropout=False)
    state = TrainState.create(trainable, tx, args.seed)
    rng = np.random.default_rng(args.seed)
    labels = rng.integers(2, model.config.vocab_size, (8, 8), dtype=np.int32)
    batch = {"input_ids": rng.integers(2, model.config.vocab_size, (8, 128), dtype=np.int32),
             "attention_mask": np.ones((8, 128), np.int32), "labels": labels,
             "decoder_input_ids": np.concatenate([np.zeros((8, 1), np.int32), labels[:, :-1]], 1),
             "decoder_attention_mask": np.ones((8, 8), np.int32)}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    frozen = {"theta0": theta0, "constants": constants}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    _reset_peak()

    def one():
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        return metrics

    losses = [float(one()["loss"])]  # warm-up step, untimed
    timing = _timed(one, args.repeats)
    losses.append(float(one()["loss"]))
    result = {"compile_s": compile_s, "peak_rss_mb": _status_mb("VmHWM"), "losses": losses,
              **timing}
    print(f"train step {timing['wall_s']:.2f} s (compile {compile_s:.1f} s, peak RSS "
          f"{result['peak_rss_mb']:.0f} MB, loss {losses[0]:.3f} -> {losses[-1]:.3f})", flush=True)
    return result


# ----------------------------------------------------------------------------- main


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [(int(b), int(r)) for b, r in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fwht-sizes wants bits:rows[,bits:rows], got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="t5-base", help="T5 preset (compacter_jax.models)")
    p.add_argument("--intrinsic-dim", type=int, default=20_000)
    p.add_argument("--said", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=False,
                   help="scanned parameter tree ({stack}/blocks/...)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--max-chunk-elements", type=int, default=ff.MAX_CHUNK_ELEMENTS)
    p.add_argument("--fwht", action=argparse.BooleanOptionalAction, default=True,
                   help="time the transform variants first")
    p.add_argument("--fwht-sizes", type=_parse_sizes, default=_parse_sizes("25:1,22:8,20:32"),
                   help="bits:rows list of [rows, 2**bits] inputs")
    p.add_argument("--fwht-block-bits", default="1,2,3,4,5,6,8")
    p.add_argument("--intrinsic", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--train-step", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "library_fwht_block_bits": ff.FWHT_BLOCK_BITS,
        "machine": {"platform": platform.platform(), "backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()],
                    "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__},
    }
    if args.fwht:
        blocks = [int(b) for b in args.fwht_block_bits.split(",")]
        result["fwht"] = fwht_variants(args.fwht_sizes, args.repeats, blocks)
    if args.intrinsic:
        result["intrinsic"] = intrinsic(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
