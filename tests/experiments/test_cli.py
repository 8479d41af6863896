"""The experiment CLIs as a user runs them: a bad value is one `error:` line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module, flags, message", [
    ("experiments.pretrain", ["--config.num_train_steps=0"], "--config.num_train_steps must be positive"),
    ("experiments.multitask", ["--config.tasks=rte,rtee"], "unknown task 'rtee'"),
])
def test_bad_value_exits_2_with_one_error_line(module, flags, message, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", module, "--workdir", str(tmp_path / "run"), *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
