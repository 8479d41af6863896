"""One efficiency measurement: one model + one PEFT method, in the current process.

`benchmarks.efficiency` runs `measure(BenchConfig)` in a fresh subprocess per method, so the
peak memory of one method never includes another's. What is measured (all in this process):

* trainable_params: scalars in the trainable tree (`peft.count`).
* compile_time_s: `jax.jit(train_step, donate_argnums=0).lower(...)` + `.compile()`, timed
  separately (lower_time_s, also reported) from execution.
* step_time_s: median wall time of `timed_steps` train steps after `warmup_steps`, each
  ended by `block_until_ready`; examples_per_s = batch / step_time_s.
* generation_time_s: median of `gen_repeats` greedy decodes of exactly tgt_len tokens on the
  batch (eos disabled so random weights cannot stop early), after one compiling call.
* peak_memory_mb: CPU: the process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) after the
  run, i.e. including parameter init and XLA compilation. Also train_peak_rss_mb: the peak RSS
  of the timed steps alone (VmHWM reset through /proc/self/clear_refs after compilation;
  null where the kernel refuses). GPU/TPU: `device.memory_stats()["peak_bytes_in_use"]`.
* xla_step_peak_mb: XLA's own account of the compiled train step (`compiled.memory_analysis()`,
  `xla_memory`): arguments (trainable state, frozen params, batch) + outputs + temporaries
  (activations kept for the backward pass, workspace) - aliased bytes (the donated state,
  written in place). It is what the device must hold during one step, independent of the
  allocator, of compilation and of other processes: on CPU the figure to compare with the
  paper's GPU peak memory (`peak_bytes_in_use` counts the same buffers plus allocator
  fragmentation); on a loaded machine it does not move, unlike RSS. The parts are in
  xla_argument_mb, xla_output_mb, xla_temp_mb, xla_alias_mb, xla_code_mb.
* model_flops_per_step: 3 x the forward matmul FLOPs of the T5 (`t5_forward_flops`), the
  usual "model FLOPs" convention (same for every method, so PEFT methods, which skip the
  weight gradients, get credit for work they do not do); mfu = model_flops_per_step /
  step_time_s / (peak_tflops * 1e12) when `peak_tflops` is given.
  xla_flops_per_step: `compiled.cost_analysis()["flops"]`. XLA counts a while-loop body once,
  so with scanned layers it covers one block per stack: comparable between methods, not a
  total.
"""

from __future__ import annotations

import dataclasses
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax import peft
from compacter_jax.models import greedy_generate, shift_right
from compacter_jax.train import TrainState, make_optimizer, make_train_step, seq2seq_apply_fn


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One measurement. `scan`: scan over layers where the method allows it (methods with
    adapters in some blocks only are never scanned; `scanned` in the result says what ran)."""

    model: str = "random:t5-base"
    method: str = "compacter++"
    batch: int = 8
    src_len: int = 128
    tgt_len: int = 8
    steps: int = 5
    warmup_steps: int = 2
    gen_repeats: int = 3
    dtype: str = "float32"
    scan: bool = True
    remat: bool = False
    per_example_dropout: bool = False  # as experiments/configs/glue.py
    peak_tflops: float = 0.0
    reduction_factor: int | None = None
    seed: int = 0
    cpu_memory_scheduler: bool = False  # XLA:CPU schedules for memory, not concurrency

    def __post_init__(self) -> None:
        for f in ("batch", "src_len", "tgt_len", "steps"):
            if getattr(self, f) < 1:
                raise ValueError(f"--{f.replace('_', '-')} must be >= 1, got {getattr(self, f)}")
        if self.warmup_steps < 0 or self.gen_repeats < 0:
            raise ValueError("warmup_steps and gen_repeats must be >= 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


def make_batch(batch: int, src_len: int, tgt_len: int, vocab: int, seed: int = 0
               ) -> dict[str, np.ndarray]:
    """A random full-length batch (DESIGN.md "Batches"): int32 ids in [2, vocab), no padding."""
    rs = np.random.RandomState(seed)
    labels = rs.randint(2, vocab, size=(batch, tgt_len)).astype(np.int32)
    return {
        "input_ids": rs.randint(2, vocab, size=(batch, src_len)).astype(np.int32),
        "attention_mask": np.ones((batch, src_len), np.int32),
        "labels": labels,
        "decoder_input_ids": np.asarray(shift_right(labels)),
        "decoder_attention_mask": np.ones((batch, tgt_len), np.int32),
    }


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc/self/status, in MiB (None if unreadable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def xla_memory(compiled) -> dict[str, float | None]:
    """The compiled program's buffer sizes from XLA (`compiled.memory_analysis()`), in MiB.

    Returns xla_argument_mb, xla_output_mb, xla_temp_mb, xla_alias_mb (outputs written into
    donated arguments), xla_code_mb and xla_step_peak_mb = arguments + outputs + temporaries -
    aliased: the memory live while one call runs (all None where the backend has no
    analysis)."""
    keys = ("argument", "output", "temp", "alias", "generated_code")
    try:
        stats = compiled.memory_analysis()
        sizes = {k: getattr(stats, f"{k}_size_in_bytes") / 2**20 for k in keys}
    except Exception:  # not every backend implements it
        return {"xla_argument_mb": None, "xla_output_mb": None, "xla_temp_mb": None,
                "xla_alias_mb": None, "xla_code_mb": None, "xla_step_peak_mb": None}
    peak = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return {"xla_argument_mb": sizes["argument"], "xla_output_mb": sizes["output"],
            "xla_temp_mb": sizes["temp"], "xla_alias_mb": sizes["alias"],
            "xla_code_mb": sizes["generated_code"], "xla_step_peak_mb": peak}


def t5_forward_flops(cfg, batch: int, src_len: int, tgt_len: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one T5 forward pass: projections, attention
    scores and values, feed-forward and the lm_head (PEFT modules and soft prompts ignored)."""
    d, inner, ff, v = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.vocab_size
    n_ff = 3 if cfg.is_gated else 2
    es, dt = batch * src_len, batch * tgt_len
    enc = cfg.num_layers * (es * (4 * d * inner + n_ff * d * ff)
                            + 2 * batch * src_len * src_len * inner)
    dec = cfg.num_decoder_layers * (
        dt * (4 * d * inner + 2 * d * inner + n_ff * d * ff) + es * 2 * d * inner
        + 2 * batch * tgt_len * tgt_len * inner + 2 * batch * tgt_len * src_len * inner)
    return 2.0 * (enc + dec + dt * d * v)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        import os
        return f"cpu: {_cpu_name()} ({os.cpu_count()} cores)"
    return f"{d.platform}: {d.device_kind}"


def _timed(fn, n: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds of n calls; appends each call's process CPU seconds (all threads) to
    `cpu`, which is less sensitive than wall time to other processes on a shared machine."""
    times = []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return times


def compiler_options(cfg: BenchConfig) -> dict[str, Any] | None:
    """XLA options of the train step's compilation: with `cpu_memory_scheduler` on a CPU, XLA's
    concurrency-optimised scheduler (the CPU default, which runs independent work early so
    that threads can overlap it) is switched off, so the schedule minimises live memory."""
    if cfg.cpu_memory_scheduler and jax.devices()[0].platform == "cpu":
        return {"xla_cpu_enable_concurrency_optimized_scheduler": False}
    return None


def measure(cfg: BenchConfig) -> dict[str, Any]:
    """Runs one measurement; returns the JSON row (see the module docstring)."""
    method = peft.get_method(cfg.method)
    adapters = "reduction_factor" in method.field_names()  # adapter families and LST
    if cfg.reduction_factor and adapters:  # e.g. t5-tiny: 64 // 32 = 2 < n
        method = method.replace(reduction_factor=cfg.reduction_factor)
    scanned = cfg.scan and method.hooks().uniform_over_layers()
    rng = jax.random.PRNGKey(cfg.seed)
    t0 = time.perf_counter()
    model, params = peft.from_pretrained(cfg.model, method, rng=rng, dtype=cfg.dtype,
                                         scan_layers=scanned, remat=cfg.remat)
    trainable, frozen = method.partition(params)
    del params  # trainable/frozen hold the same buffers: nothing is copied
    n_trainable, n_frozen = peft.count(trainable), peft.count(frozen)
    load_time = time.perf_counter() - t0
    rss_loaded = _rss_mb("VmRSS")

    tx, schedule = make_optimizer(method.learning_rate, 0, 10_000)
    state = TrainState.create(trainable, tx, cfg.seed)
    del trainable  # the state owns them now (donated each step)
    step = make_train_step(seq2seq_apply_fn(model), tx, merge_fn=method.combine,
                           schedule=schedule, per_example_dropout=cfg.per_example_dropout)
    host_batch = make_batch(cfg.batch, cfg.src_len, cfg.tgt_len, model.config.vocab_size,
                            cfg.seed)
    batch = {k: jnp.asarray(v) for k, v in host_batch.items()}

    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=compiler_options(cfg))
    t2, c2 = time.perf_counter(), time.process_time()
    flops = _flops(compiled)
    xla_mem = xla_memory(compiled)
    peak_reset = _reset_peak_rss()

    def one_step():
        nonlocal state
        state, metrics = compiled(state, frozen, batch)
        return state, metrics

    warm = _timed(one_step, cfg.warmup_steps)
    cpu_times: list[float] = []
    times = _timed(one_step, cfg.steps, cpu_times)
    train_peak = _rss_mb("VmHWM") if peak_reset else None
    loss = float(np.asarray(one_step()[1]["loss"]))

    gen_compile, gen_time = None, None
    if cfg.gen_repeats:
        full = method.combine(state.params, frozen)
        gen = lambda: greedy_generate(model, full, batch["input_ids"],  # noqa: E731
                                      batch["attention_mask"], max_new_tokens=cfg.tgt_len,
                                      eos_id=-1)
        gen_compile = _timed(gen, 1)[0]
        gen_time = statistics.median(_timed(gen, cfg.gen_repeats))

    dev = jax.devices()[0]
    peak_device = None
    if dev.platform != "cpu":
        stats = dev.memory_stats() or {}
        peak_device = stats.get("peak_bytes_in_use")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    step_time = statistics.median(times)
    model_flops = 3 * t5_forward_flops(model.config, cfg.batch, cfg.src_len, cfg.tgt_len)
    peak_mb = peak_device / 2**20 if peak_device is not None else peak_rss
    return {
        "method": cfg.method,
        "model": cfg.model,
        "batch": cfg.batch, "src_len": cfg.src_len, "tgt_len": cfg.tgt_len,
        "reduction_factor": method.reduction_factor if adapters else None,
        "dtype": cfg.dtype, "scanned": scanned, "remat": cfg.remat,
        "compiler_options": compiler_options(cfg),
        "per_example_dropout": cfg.per_example_dropout,
        "trainable_params": n_trainable, "total_params": n_trainable + n_frozen,
        "step_time_s": step_time,
        "step_times_s": times, "warmup_times_s": warm,
        "step_cpu_s": statistics.median(cpu_times),
        "examples_per_s": cfg.batch / step_time,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "device_peak_bytes" if peak_device is not None else "host_peak_rss",
        "host_peak_rss_mb": peak_rss,
        "train_peak_rss_mb": train_peak,
        "rss_after_load_mb": rss_loaded,
        **xla_mem,
        "compile_time_s": t2 - t0, "lower_time_s": t1 - t0, "compile_cpu_s": c2 - c0,
        "load_time_s": load_time,
        "generation_time_s": gen_time, "generation_compile_s": gen_compile,
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": flops,
        "achieved_tflops": model_flops / step_time / 1e12,
        "mfu": (model_flops / step_time / (cfg.peak_tflops * 1e12)
                if cfg.peak_tflops > 0 else None),
        "final_loss": loss,
        "device": device_description(),
        "jax_version": jax.__version__,
        "framework": "jax",
    }
