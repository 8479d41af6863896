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
    ("experiments.multitask", ["--config.task=rte"],  # issue 19: was silently ignored
     "--config.task: config has no field 'task'; valid fields: add_task_prefix"),
])
def test_bad_value_exits_2_with_one_error_line(module, flags, message, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", module, "--workdir", str(tmp_path / "run"), *flags],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def _fields(config, prefix="--config"):
    from ml_collections import ConfigDict
    for key in config.keys():
        value = config[key]
        if isinstance(value, ConfigDict):
            yield from _fields(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", value


def test_print_config_lists_every_field_with_its_default(tmp_path):
    """`--print_config` (no --workdir needed) prints one line per config field, nested
    `peft.<field>` placeholders included, with overrides applied; --help mentions it."""
    from experiments.configs.glue import get_config

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "experiments.glue", "--print_config",
                          "--config.task=rte", "--config.seed=7"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = {line.split("=", 1)[0]: line.split("=", 1)[1].split("  # ")[0]
               for line in out.stdout.splitlines()}
    want = dict(_fields(get_config()))
    want.update({"--config.task": "rte", "--config.seed": 7})
    assert set(printed) == set(want)                   # every field, nothing else
    assert {k: printed[k] for k in want} == {k: repr(v) for k, v in want.items()}
    assert "--config.peft.reduction_factor=None  # int" in out.stdout
    helptext = subprocess.run([sys.executable, "-m", "experiments.glue", "--help"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=120).stdout
    assert "--print_config" in helptext


@pytest.mark.parametrize("run, fields, message", [
    ("pretrain", {"noise_density": 1.5}, "--config.noise_density=1.5: must be in (0, 1)"),
    ("pretrain", {"batch_size": -4}, "--config.batch_size=-4: must be a positive integer"),
    ("pretrain", {"eval_every": -2}, "--config.eval_every=-2: must be 0 (never) or a number"),
    ("multitask", {"batch_size": 0}, "--config.batch_size=0: must be a positive integer"),
])
def test_every_cli_exits_2_on_a_bad_value_before_it_loads_anything(run, fields, message,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """`cli.run`, the command after flag parsing, for the runs other than glue (whose cases
    are tests/experiments/test_glue_cli_errors.py): one `error:` line, exit 2, nothing loaded
    and the workdir never claimed."""
    from experiments import backbone, cli, multitask, pretrain
    from experiments.configs import multitask as multitask_config
    from experiments.configs import pretrain as pretrain_config

    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before the config was checked")
    monkeypatch.setattr(pretrain, "build_documents", refuse)
    monkeypatch.setattr(backbone, "resolve_model", refuse)
    module, config = {"pretrain": (pretrain, pretrain_config.get_config("tiny")),
                      "multitask": (multitask, multitask_config.get_config())}[run]
    config.update(fields)
    check = pretrain.spec_lib.pretrain_spec if run == "pretrain" else multitask.check_config
    code = cli.run(module.train_and_evaluate, config, str(tmp_path / "run"), check=check)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value, want", [
    ("/abs/a/adapter,/abs/b-2/adapter", ("/abs/a/adapter", "/abs/b-2/adapter")),  # absl refused it
    ("runs/a,runs/b", ("runs/a", "runs/b")),        # absl read one string "runs/a,runs/b"
    ("'/abs/a','/abs/b'", ("/abs/a", "/abs/b")),    # a Python literal: left to absl
    ("/abs/a", ("/abs/a",)),
])
def test_a_comma_separated_tuple_override_is_a_list_of_paths(value, want):
    """`--config.peft.sources=/abs/a,/abs/b` (the README's ATTEMPT command with absolute
    paths) reaches the config as a tuple of the paths; str fields are left alone."""
    from absl import flags
    from ml_collections import config_flags

    from experiments import cli
    from experiments.configs.glue import get_config
    from experiments.configs.multitask import get_config as multitask_config

    argv = cli.comma_lists(get_config(), ["prog", f"--config.peft.sources={value}"])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", get_config(), flag_values=fv, sys_argv=argv)
    fv(argv)
    assert fv.config.peft.sources == want
    kept = ["prog", "--config.tasks=rte,mrpc"]
    assert cli.comma_lists(multitask_config(), kept) == kept   # tasks is a str field
