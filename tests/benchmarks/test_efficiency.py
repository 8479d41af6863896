"""Smoke test of the efficiency harness (subprocess per method) on random:t5-tiny, 2 steps.

No timing assertions: only that every documented field is there and consistent. ~1 min on
2 shared cores (two children, each compiling a tiny train step and greedy decoding).
"""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import efficiency, report
from benchmarks.measure import BenchConfig

REQUIRED = ("method", "trainable_params", "step_time_s", "peak_memory_mb", "compile_time_s",
            "examples_per_s", "generation_time_s", "model", "batch", "src_len", "tgt_len",
            "dtype", "device", "jax_version", "xla_step_peak_mb")


@pytest.mark.slow
@pytest.mark.long  # ~90 s of subprocess compiles; tests/benchmarks/test_throughput.py smokes the same child-process harness
def test_harness_end_to_end_on_tiny(tmp_path):
    out = tmp_path / "tiny.json"
    rows = efficiency.main([
        "--model", "random:t5-tiny", "--methods", "full,compacter++", "--batch", "2",
        "--src-len", "16", "--tgt-len", "4", "--steps", "2", "--warmup", "0",
        "--gen-repeats", "1", "--reduction-factor", "8", "--json", str(out)])
    assert [r.get("error") for r in rows] == [None, None]
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved] == ["full", "compacter++"]
    full, cpp = saved
    for row in saved:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert row["batch"] == 2 and row["src_len"] == 16 and row["tgt_len"] == 4
        assert len(row["step_times_s"]) == 2 and row["step_time_s"] > 0
        assert row["examples_per_s"] == pytest.approx(2 / row["step_time_s"])
        assert row["peak_memory_mb"] > 0 and row["compile_time_s"] > 0
        assert row["generation_time_s"] > 0
        assert math.isfinite(row["final_loss"])  # not NaN, not inf
    # full trains everything; Compacter++ (PHM adapters + layer norms) a small part of it.
    assert full["trainable_params"] == full["total_params"]
    assert 0 < cpp["trainable_params"] < 0.1 * cpp["total_params"]
    assert cpp["total_params"] > full["total_params"]  # the adapters are extra parameters
    table = out.with_suffix(".md").read_text()
    assert "| full |" in table and "1.00x" in table
    assert out.with_suffix(".png").stat().st_size > 1000


def test_table_ratios_against_full():
    rows = [
        {"method": "full", "trainable_params": 100, "total_params": 100, "step_time_s": 2.0,
         "examples_per_s": 4.0, "peak_memory_mb": 1000.0, "compile_time_s": 1.0},
        {"method": "lora", "trainable_params": 5, "total_params": 105, "step_time_s": 0.5,
         "examples_per_s": 16.0, "peak_memory_mb": 250.0, "compile_time_s": 1.0,
         "generation_time_s": None},
        {"method": "bitfit", "error": "exit 1: boom"},
    ]
    lines = report.markdown_table(rows).splitlines()
    assert len(lines) == 2 + 3
    lora = lines[3].split("|")
    assert lora[5].strip() == "0.25x" and lora[10].strip() == "0.25x"
    assert lora[7].strip() == "–"  # no CPU time in these rows
    assert "failed" in lines[4]
    no_full = report.markdown_table(rows[1:2]).splitlines()[2]
    assert "–" in no_full


def test_bad_arguments_name_the_option():
    with pytest.raises(ValueError, match="--src-len"):
        BenchConfig(src_len=0)
    with pytest.raises(SystemExit, match="unknown"):
        efficiency.parse_methods("full,nope")


def test_xla_memory_counts_arguments_outputs_and_donation():
    """xla_step_peak_mb = arguments + outputs + temporaries - aliased, with the argument and
    output sizes those of the arrays themselves (a donated argument aliases its output)."""
    import jax
    import jax.numpy as jnp

    from benchmarks.measure import xla_memory

    x = jnp.ones((256, 512), jnp.float32)  # 0.5 MiB
    w = jnp.ones((512, 128), jnp.float32)  # 0.25 MiB

    def f(x, w):
        return x + 1.0, x @ w  # [256, 512] (can reuse x's buffer) and [256, 128]

    mb = 2.0**-20
    kib = 2.0**-10  # XLA adds a few bytes for tuple index tables (pointers) of the outputs
    plain = xla_memory(jax.jit(f).lower(x, w).compile())
    assert plain["xla_argument_mb"] == pytest.approx((x.nbytes + w.nbytes) * mb, abs=kib)
    assert plain["xla_output_mb"] == pytest.approx((x.nbytes + 256 * 128 * 4) * mb, abs=kib)
    assert plain["xla_alias_mb"] == 0
    donated = xla_memory(jax.jit(f, donate_argnums=0).lower(x, w).compile())
    assert donated["xla_alias_mb"] == pytest.approx(x.nbytes * mb, abs=kib)
    for m in (plain, donated):
        assert m["xla_step_peak_mb"] == pytest.approx(
            m["xla_argument_mb"] + m["xla_output_mb"] + m["xla_temp_mb"] - m["xla_alias_mb"])


def test_table_has_the_xla_step_peak_ratio():
    rows = [{"method": "full", "trainable_params": 1, "total_params": 1, "step_time_s": 1.0,
             "examples_per_s": 1.0, "peak_memory_mb": 10.0, "compile_time_s": 1.0,
             "xla_step_peak_mb": 400.0},
            {"method": "lst", "trainable_params": 1, "total_params": 2, "step_time_s": 1.0,
             "examples_per_s": 1.0, "peak_memory_mb": 10.0, "compile_time_s": 1.0,
             "xla_step_peak_mb": 100.0}]
    lst = report.markdown_table(rows).splitlines()[3].split("|")
    assert lst[-3].strip() == "100" and lst[-2].strip() == "0.25x"


def test_cpu_memory_scheduler_is_a_valid_xla_option():
    import jax
    import jax.numpy as jnp

    from benchmarks.measure import compiler_options

    assert compiler_options(BenchConfig()) is None
    options = compiler_options(BenchConfig(cpu_memory_scheduler=True))
    if jax.devices()[0].platform != "cpu":
        assert options is None
        return
    assert options == {"xla_cpu_enable_concurrency_optimized_scheduler": False}
    x = jnp.arange(6.0)
    compiled = jax.jit(lambda v: v * 2).lower(x).compile(compiler_options=options)  # XLA knows it
    assert compiled(x).tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
