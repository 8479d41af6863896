"""`python -m experiments.glue` on bad input: exit 2 and one line `error: ...` that names the
flag, field or file and the fix; never a traceback, never a silent wrong result (issue 12).

Most cases call the CLI's `glue.run(config, workdir)` in-process (the same code path as the
command line after flag parsing); flag-parsing errors run the real command, in parallel.
Every case fails before anything is compiled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import finetune, glue
from experiments.configs.glue import get_config

ROOT = Path(__file__).resolve().parents[2]
TINY_FLAGS = ["--config.task=rte", "--config.model=random:t5-tiny", "--config.fallback_model=",
              "--config.peft.reduction_factor=8", "--config.max_source_length=32",
              "--config.batch_size=8", "--config.max_eval_samples=8", "--config.num_devices=1"]


def tiny(**overrides):
    c = get_config()
    c.task, c.model, c.fallback_model = "rte", "random:t5-tiny", ""
    c.peft.reduction_factor = 8
    c.max_source_length, c.batch_size, c.max_eval_samples, c.num_devices = 32, 8, 8, 1
    c.train_samples, c.max_steps = 32, 2
    for key, value in overrides.items():
        target = c.peft if key.startswith("peft.") else c
        setattr(target, key.removeprefix("peft."), value)
    return c


def run_cli(config, workdir, capsys):
    code = glue.run(config, str(workdir))
    err = capsys.readouterr().err
    return code, err


# ------------------------------------------------------------------ config values (items 4, 11, 12)

CONFIG_CASES = [
    ("batch_size 0", {"batch_size": 0}, r"--config.batch_size=0: must be a positive integer"),
    ("eval_batch_size 0 (before training)", {"eval_batch_size": 0},
     r"--config.eval_batch_size=0: must be a positive integer"),
    ("seed -1", {"seed": -1}, r"--config.seed=-1: must be an integer in 0..2\*\*32-1"),
    ("learning_rate 0 is not replaced", {"learning_rate": 0.0},
     r"--config.learning_rate=0.0: must be a positive finite float32"),
    ("learning_rate 1e39 overflows float32", {"learning_rate": 1e39},
     r"--config.learning_rate=1e\+39: must be a positive finite float32"),
    ("num_devices 8 of 4", {"num_devices": 8},
     r"--config.num_devices=8: only 4 device\(s\) are available; use -1"),
    ("padded batch not divisible by devices", {"num_devices": 4, "batch_size": 6,
                                               "packing": False},
     r"--config.batch_size=6 is not divisible by the 4 devices"),
    ("unknown task", {"task": "rtee"}, r"--config.task: unknown task 'rtee'.*rte"),
    ("unknown method", {"method": "compacter+++"},
     r"--config.method: unknown PEFT method 'compacter\+\+\+'.*compacter\+\+"),
    ("field of another method", {"peft.length": 5},
     r"--config.peft: unknown field\(s\) \['length'\] for method 'compacter\+\+'"),
    ("method does not fit the preset", {"peft.reduction_factor": 32},
     r"--config.peft with --config.model='random:t5-tiny':.*reduction_factor"),
    ("unknown eval mode", {"eval_mode": "greedy"}, r"--config.eval_mode='greedy': use one of"),
    ("unknown strategy", {"strategy": "vmap"}, r"--config.strategy='vmap': use one of jit, pmap"),
    ("keep 0 checkpoints", {"keep_checkpoints": 0}, r"--config.keep_checkpoints=0"),
    ("coordinator without port", {"coordinator_address": "localhost"},
     r"--config.coordinator_address='localhost': expected host:port"),
    ("process id out of range", {"num_processes": 2, "process_id": 2},
     r"--config.process_id=2: must be below --config.num_processes=2"),
    ("nonexistent data_dir", {"data_dir": "/nonexistent/data"},
     r"--config.data_dir='/nonexistent/data': no such directory"),
    ("nonexistent model path", {"model": "/nonexistent/t5"},
     r"--config.model='/nonexistent/t5': /nonexistent/t5 is not a directory with config.json"),
    ("explicit uncached Hub id: no fallback", {"model": "t5-large",
                                                "fallback_model": "random:t5-tiny"},
     r"model 'google-t5/t5-large'.*not in the local HF cache.*hf download"),
]


@pytest.mark.parametrize("overrides, message", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(overrides, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(tiny(**overrides), tmp_path / "run", capsys)
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any work


# ------------------------------------------------------------ model files (items 2, 11, 12)

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A t5-tiny checkpoint of random numpy weights (no init program to compile: these runs
    fail before anything would use the values)."""
    import jax

    from compacter_jax.models import (T5ForConditionalGeneration, get_preset, param_shapes,
                                      save_pretrained)

    config = get_preset("t5-tiny")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.normal(0.0, 0.05, s.shape).astype(s.dtype),
        param_shapes(T5ForConditionalGeneration(config)))
    return save_pretrained(tmp_path_factory.mktemp("t5tiny"), config, params)


def _model_dir(src, dst, edit_config=None, edit_weights=None):
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(edit_config(cfg)))
    if edit_weights is not None:
        from safetensors.numpy import load_file, save_file

        save_file(edit_weights(load_file(dst / "model.safetensors")), dst / "model.safetensors")
    return dst


def _nan_weight(tensors):
    tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"][0, 0] = np.nan
    return tensors


def _no_weights(src, dst):
    _model_dir(src, dst)
    (dst / "model.safetensors").unlink()
    return dst


def _truncated_weights(src, dst):
    _model_dir(src, dst)
    (dst / "model.safetensors").write_bytes((dst / "model.safetensors").read_bytes()[:100])
    return dst


MODEL_CASES = [  # (name, make, message, found before any data are loaded)
    ("dir without config.json", lambda s, d: (_model_dir(s, d), (d / "config.json").unlink(), d)[2],
     r"missing .*/config.json: a T5 checkpoint directory needs config.json", True),
    ("dir without weights", _no_weights, r"no model.safetensors or model.safetensors.index.json",
     True),
    ("truncated weights", _truncated_weights,
     r"cannot read safetensors file .*model.safetensors \(corrupt or truncated\?\)", True),
    ("config.json holds a list", lambda s, d: _model_dir(s, d, edit_config=lambda c: [c]),
     r"config.json: config.json must hold a JSON object of T5 settings, got a JSON array", True),
    ("num_layers 'two'", lambda s, d: _model_dir(
        s, d, edit_config=lambda c: {**c, "num_layers": "two"}),
     r"config.json: config.json field 'num_layers' must be an integer, got 'two'", True),
    ("d_model 63 is a shape mismatch, not a PHM error", lambda s, d: _model_dir(
        s, d, edit_config=lambda c: {**c, "d_model": 63}),
     r"shape mismatch for '.*' in .*: expected \(\d+, 63\) from config.json, found \(\d+, 64\)",
     False),
    ("NaN in the weights is not blamed on the learning rate", lambda s, d: _model_dir(
        s, d, edit_weights=_nan_weight),
     r"checkpoint weight 'encoder.block.1.layer.1.DenseReluDense.wo.weight' in .* holds 1 "
     r"NaN/inf values: the file is corrupt", False),
]


@pytest.mark.parametrize("make, message, up_front", [c[1:] for c in MODEL_CASES],
                         ids=[c[0] for c in MODEL_CASES])
def test_bad_model_files_never_fall_back(make, message, up_front, tiny_checkpoint, shared_data,
                                         tmp_path, capsys, monkeypatch):
    model_dir = make(tiny_checkpoint, tmp_path / "model")
    if up_front:  # the config and weight headers are checked before the data are read
        def no_data(*args, **kwargs):
            raise AssertionError("data were loaded before the model was checked")
        monkeypatch.setattr(finetune, "load_data", no_data)
    code, err = run_cli(tiny(model=str(model_dir), fallback_model="random:t5-tiny"),
                        tmp_path / "run", capsys)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert "FALLING BACK" not in err


# ------------------------------------------------------------------ data files (items 6, 12)

def _data(shared_data, tmp_path, task_dir, edit):
    root = tmp_path / "data"
    shutil.copytree(shared_data / task_dir, root / task_dir)
    edit(root / task_dir)
    return root


def _replace_line(path, lineno, fn):
    lines = path.read_bytes().split(b"\n")
    lines[lineno] = fn(lines[lineno])
    path.write_bytes(b"\n".join(lines))


def _stsb_score(value):
    return lambda d: _replace_line(d / "train.tsv", 3, lambda line: line.rsplit(b"\t", 1)[0]
                                   + b"\t" + value)


DATA_CASES = [
    ("malformed row", "glue/RTE", "rte",
     lambda d: open(d / "train.tsv", "a").write("9999\tonly two columns\n"),
     r"RTE/train.tsv:2492: .*got 2"),
    ("latin-1 TSV", "glue/RTE", "rte",
     lambda d: _replace_line(d / "train.tsv", 5, lambda line: line + "caf\u00e9".encode("latin-1")),
     r"RTE/train.tsv:6: byte offset \d+ \(0xe9\): not valid UTF-8.*re-encode it"),
    ("CR-only line endings", "glue/RTE", "rte",
     lambda d: (d / "train.tsv").write_bytes((d / "train.tsv").read_bytes().replace(b"\n", b"\r")),
     r"RTE/train.tsv: lines end in a bare carriage return.*convert the line endings"),
    ("binary JSONL", "superglue/CB", "cb",
     lambda d: (d / "train.jsonl").write_bytes(b"\x00\xff\xfe" * 50),
     r"CB/train.jsonl.*UTF-8"),
    ("CB premise null", "superglue/CB", "cb",
     lambda d: _replace_line(d / "train.jsonl", 2, lambda line: json.dumps(
         {**json.loads(line), "premise": None}).encode()),
     r"CB/train.jsonl:3: field 'premise' is null"),
    ("STS-B score inf", "glue/STS-B", "stsb", _stsb_score(b"inf"), r"STS-B/train.tsv:4:.*inf"),
    ("STS-B score -1", "glue/STS-B", "stsb", _stsb_score(b"-1"), r"STS-B/train.tsv:4:.*0..5"),
    ("STS-B score 7.5", "glue/STS-B", "stsb", _stsb_score(b"7.5"), r"STS-B/train.tsv:4:.*0..5"),
]


@pytest.mark.parametrize("task_dir, task, edit, message", [c[1:] for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_name_file_and_line(task_dir, task, edit, message, shared_data,
                                           tmp_path, capsys):
    root = _data(shared_data, tmp_path, task_dir, edit)
    code, err = run_cli(tiny(task=task, source="files", data_dir=str(root)), tmp_path / "run",
                        capsys)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_missing_data_dir_names_the_path_and_the_setting(tmp_path, t5_vocab, capsys):
    missing = tmp_path / "nowhere"
    code, err = run_cli(tiny(source="files", data_dir=str(missing), tokenizer=str(t5_vocab)),
                        tmp_path / "run", capsys)
    assert code == 2 and str(missing) in err and "data_dir" in err, err


# ------------------------------------------------------------------ workdirs (items 1, 8, 11)

def _file_at(name):
    def make(workdir):
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text("in the way")
    return make


def _dir_at(name):
    def make(workdir):
        (workdir / name).mkdir(parents=True)
    return make


def _finished_run_of(**config):
    """A workdir that holds progress of a run with `config` changed from tiny()'s."""
    def make(workdir):
        (workdir / "checkpoints" / "steps" / "2").mkdir(parents=True)
        (workdir / "run_config.json").write_text(json.dumps(
            {"config": tiny(**config).to_dict(), "history": []}))
    return make


WORKDIR_CASES = [
    ("workdir is a file", lambda w: w.write_text("x"), r"--workdir .* is a file, not a directory"),
    ("checkpoints is a file", _file_at("checkpoints"),
     r"run/checkpoints is a file, but the run writes orbax checkpoints there"),
    ("tensorboard is a file", _file_at("tensorboard"), r"run/tensorboard is a file"),
    ("adapter is a file", _file_at("adapter"), r"run/adapter is a file, but the run writes "
                                               r"the exported adapter there"),
    ("summary.json is a directory", _dir_at("summary.json"),
     r"run/summary.json is a directory, but the run writes the run's summary there"),
    ("learning_curves.png is a directory", _dir_at("learning_curves.png"),
     r"run/learning_curves.png is a directory"),
    ("resume with another task", _finished_run_of(task="mrpc"),
     r"holds a run of another experiment \(task: 'mrpc' -> 'rte'\).*Use a new --workdir"),
    ("resume with another learning rate", _finished_run_of(learning_rate=0.5),
     r"was started with a different config \(learning_rate: 0.5 -> None\).*"
     r"--config.allow_config_change=True"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in WORKDIR_CASES],
                         ids=[c[0] for c in WORKDIR_CASES])
def test_bad_workdirs_are_refused_up_front(make, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    make(workdir)
    code, err = run_cli(tiny(), workdir, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert re.search(message, err), err


def test_read_only_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:  # root ignores permission bits; an immutable directory it cannot
        immutable = subprocess.run(["chattr", "+i", str(workdir)],
                                   capture_output=True).returncode == 0
        if not immutable:
            pytest.skip("running as root and chattr +i is unavailable: cannot make a "
                        "read-only directory")
    try:
        code, err = run_cli(tiny(), workdir, capsys)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(workdir)], check=True)
        workdir.chmod(0o755)
    assert code == 2 and "Traceback" not in err, err
    assert f"--workdir {workdir} is not writable" in err, err


def test_a_workdir_in_use_is_refused_naming_the_holder(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from experiments.workdir import WorkdirLock; "
         f"WorkdirLock({str(workdir)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = run_cli(tiny(force_unlock=True), workdir, capsys)  # force: not for a live one
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert code == 2 and "Traceback" not in err, err
    assert f"is in use by another run (pid {holder.pid} on host" in err, err


# ------------------------------------------------------------------ flag parsing (item 11)

def test_bad_flags_exit_2_with_the_valid_fields(tmp_path):
    cases = {  # every unknown field is reported at once: two in one command
        "unknown fields": (["--config.peft.foo=3", "--config.bogus.x=1"],
                           r"--config.peft.foo: config.peft has no field 'foo'; valid fields: "
                           r"alpha.*; --config.bogus.x: config has no field 'bogus'"),
        "type": (["--config.batch_size=abc"], r"flag --config.batch_size=abc: invalid literal"),
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "experiments.glue", "--workdir", str(tmp_path / name),
         *TINY_FLAGS, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for name, (flags, _) in cases.items()}
    deadline = time.time() + 300
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=max(deadline - time.time(), 1))
        assert proc.returncode == 2, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert re.search(cases[name][1], err), (name, err[-2000:])
