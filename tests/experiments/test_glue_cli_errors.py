"""`python -m experiments.glue` on bad input: a non-zero exit, a clear message, no bad checkpoint."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config.model=random:t5-tiny", "--config.fallback_model=",
        "--config.peft.reduction_factor=8", "--config.max_source_length=32",
        "--config.batch_size=8", "--config.max_eval_samples=8", "--config.num_devices=1"]


def glue(workdir, *flags, env=None):
    cmd = [sys.executable, "-m", "experiments.glue", "--workdir", str(workdir), *TINY, *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_unknown_task_names_the_valid_ones(tmp_path):
    out = glue(tmp_path, "--config.task=rtee")
    assert out.returncode == 2
    assert "unknown task 'rtee'" in out.stderr and "rte" in out.stderr


def test_unknown_method_names_the_valid_ones(tmp_path):
    out = glue(tmp_path, "--config.method=compacter+++")
    assert out.returncode == 2
    assert "unknown PEFT method 'compacter+++'" in out.stderr and "compacter++" in out.stderr


def test_missing_data_dir_names_the_path_and_the_setting(tmp_path, t5_vocab):
    missing = tmp_path / "nowhere"
    out = glue(tmp_path / "run", "--config.source=files", f"--config.data_dir={missing}",
               f"--config.tokenizer={t5_vocab}")
    assert out.returncode == 2
    assert str(missing) in out.stderr and "data_dir" in out.stderr


def test_malformed_row_names_file_and_line(tmp_path, shared_data):
    data = tmp_path / "data" / "glue" / "RTE"
    data.mkdir(parents=True)
    for split in ("train", "dev"):
        shutil.copy(shared_data / "glue" / "RTE" / f"{split}.tsv", data / f"{split}.tsv")
    with open(data / "train.tsv", "a") as f:
        f.write("9999\tonly two columns\n")
    out = glue(tmp_path / "run", "--config.source=files", f"--config.data_dir={tmp_path / 'data'}")
    assert out.returncode == 2
    assert "RTE/train.tsv:2492:" in out.stderr and "got 2" in out.stderr, out.stderr[-2000:]


def test_nan_loss_stops_before_any_checkpoint(tmp_path, shared_data):
    workdir = tmp_path / "run"
    out = glue(workdir, "--config.learning_rate=1e30", "--config.max_steps=6",
               "--config.eval_every=3", "--config.warmup_steps=1", "--config.clip_norm=0")
    assert out.returncode == 2, out.stderr[-2000:]
    assert "non-finite" in out.stderr.lower() or "nan" in out.stderr.lower()
    steps = workdir / "checkpoints" / "steps"
    assert not steps.exists() or not any(steps.iterdir())
