"""Multi-host, proven on one machine: `python -m experiments.glue` as 2 processes x 2 CPU
devices (jax.distributed on 127.0.0.1, gloo collectives) trains, evaluates and checkpoints as
1 process x 4 devices does (<= 1e-5): each process feeds its slice of the global batch,
checkpoints are written once (by process 0's orbax coordination) and restored by both (the best
one after training; with COMPACTER_LONG_TESTS=1 also the step checkpoints after a simulated
kill), evaluation is split over the processes and gathered.

The reference run is shared with test_finetune_reliability.py (tiny_runs.reference_run)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from compacter_jax import peft
from tiny_runs import cli_flags, fast_compile_env, fast_compiles, reference_run

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: Path, timeout: int = 600) -> list[str]:
    """Both processes of one run; returns their stderr (asserting exit 0)."""
    port = free_port()
    flags = cli_flags() + [f"--config.coordinator_address=127.0.0.1:{port}",
                           "--config.num_processes=2"]
    # Compiled as the reference is (half the compile time), through the session's cache.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
           **fast_compile_env()}
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.glue", "--workdir",
                               str(workdir), *flags, f"--config.process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    logs = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=timeout)
            logs.append(err)
    finally:
        for proc in procs:
            proc.kill()
    for i, (proc, err) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i}:\n{err[-4000:]}"
    return logs


def events(workdir: Path) -> dict:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[(record["step"], tuple(sorted(k for k in record if k not in ("step", "time"))))] = {
            k: v for k, v in record.items() if k not in ("step", "time")}
    return out


def assert_same_run(got: Path, want: Path) -> None:
    a, b = events(got), events(want)
    assert a.keys() == b.keys()
    differ = [(key[0], metric, a[key][metric], value) for key in b
              for metric, value in b[key].items() if abs(a[key][metric] - value) > 1e-5]
    assert not differ, differ  # (step, metric, got, want)
    x, _ = peft.load_trainable(got / "adapter")
    y, _ = peft.load_trainable(want / "adapter")
    for u, v in zip(*(sorted(traverse_util.flatten_dict(t, sep='/').items())
                      for t in (x, y))):
        assert u[0] == v[0]
        np.testing.assert_allclose(u[1], v[1], atol=1e-5, rtol=0)


def skip_without_cpu_collectives() -> None:
    try:  # the CPU collectives of multi-process JAX (gloo, JAX's default on CPU)
        from jax._src.lib import _jax
    except ImportError:
        pytest.skip("jaxlib internals changed: cannot tell whether gloo CPU collectives exist")
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        pytest.skip("this jaxlib has no gloo CPU collectives: multi-process CPU runs "
                    "are unavailable")


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    """(reference: 1 process x 4 devices, the same run as 2 processes x 2 devices)."""
    skip_without_cpu_collectives()
    with fast_compiles():
        reference, _ = reference_run(tmp_path_factory)
    two = tmp_path_factory.mktemp("two_processes")
    logs = run_two_processes(two)
    assert "Traceback" not in "".join(logs)
    return reference, two


@pytest.mark.slow
def test_two_processes_of_two_devices_equal_one_process_of_four(runs):
    reference, two = runs
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["processes"], summary["devices"]) == (2, 4)
    # Losses, gradient norms, validation and test metrics at every step; the adapter, which
    # both processes restored from the best checkpoint (step 2) after training.
    assert_same_run(two, reference)
    assert summary["best_step"] == 2
    # Written once: process 0's files only (orbax: one ocdbt.process_0 per item).
    for item in ("steps/2/state", "steps/4/state", "best/2/params"):
        assert sorted(p.name for p in (two / "checkpoints" / item).iterdir()
                      if p.name.startswith("ocdbt")) == ["ocdbt.process_0"], item
    # Evaluation split over the processes and gathered: every row once, in order, as decoded
    # by the one process.
    for split in ("validation", "test"):
        got, want = ([(r["index"], r["prediction"]) for r in map(json.loads, (
            run / "predictions" / f"{split}.jsonl").read_text().splitlines())]
            for run in (two, reference))
        assert got == want and len(got) == 8, split


@pytest.mark.slow
@pytest.mark.long
def test_after_a_kill_both_processes_resume_the_same_step(runs, tmp_path):
    """A kill after step 2's checkpoint: both processes restore it and finish the same run."""
    reference, two = runs
    killed = tmp_path / "killed"
    shutil.copytree(two, killed, ignore=shutil.ignore_patterns("4", "summary.json",
                                                               "adapter", "predictions"))
    logs = run_two_processes(killed)
    for i, err in enumerate(logs):
        assert "resumed from step 2" in err, f"process {i}:\n{err[-3000:]}"
    assert_same_run(killed, reference)
