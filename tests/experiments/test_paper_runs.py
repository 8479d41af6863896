"""`experiments.paper_runs`: the paper's grid (exact counts), each run's config as the CLI parses
it, its schedule length, and the print / JSON / run modes."""

from __future__ import annotations

import json
import math
import shlex
import sys
from collections import Counter

import pytest

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.models import PRESETS as T5_PRESETS
from compacter_jax.train.optim import make_schedule
from experiments import finetune, paper, paper_runs
from experiments import spec as spec_lib
from experiments.spec.finetune import validate_config
from experiments.configs import paper as paper_config
from experiments.paper_runs import split_extra, sweep

ALL_TASKS = paper.GLUE_TASKS + paper.SUPERGLUE_TASKS
# Per method on one task: 3 reduction factors for the adapter methods, x 3 values of n for the
# PHM ones (all of 4, 8, 12 divide T5-base's 768 and its bottlenecks 24, 48, 96), 1 otherwise.
PER_TASK = {"full": 1, "adapter": 3, "pfeiffer": 3, "adapterdrop": 3, "lowrank": 3,
            "prompt_tuning": 1, "prompt_tuning_vocab": 1, "intrinsic_said": 1, "bitfit": 1,
            "phm_adapter": 9, "compacter": 9, "compacter++": 9, "lst": 1}
# The original configs' learning rates (seq2seq/configs/*.json).
ORIGINAL_LR = {"full": 3e-4, "adapter": 3e-4, "pfeiffer": 3e-4, "adapterdrop": 3e-4,
               "lowrank": 3e-3, "phm_adapter": 3e-3, "compacter": 3e-3, "compacter++": 3e-3,
               "bitfit": 3e-4, "prompt_tuning": 3e-2, "prompt_tuning_vocab": 3e-1,
               "intrinsic_said": 3e-2, "lst": 3e-3}
# Official training sets (TFDS / HF datasets row counts) and the paper's train part of each.
OFFICIAL = {"cola": 8551, "sst2": 67349, "mrpc": 3668, "qqp": 363846, "stsb": 5749,
            "mnli": 392702, "qnli": 104743, "rte": 2490, "boolq": 9427, "cb": 250, "copa": 400,
            "multirc": 27088, "record": 100730, "wic": 5428}
LARGE = {"sst2", "qqp", "qnli", "record"}  # 1,000 training rows become validation
EPOCHS = {t: 3 if t in LARGE | {"mnli"} else 20 for t in OFFICIAL}


def expected_train(task, train_samples=None):
    n = OFFICIAL[task] - (1000 if task in LARGE else 0)
    return n if train_samples is None else min(n, train_samples)


def test_methods_are_the_papers_that_are_registered():
    assert paper.METHODS == tuple(m for m in PER_TASK if m in peft.method_names())
    assert {"full", "compacter", "compacter++", "bitfit", "prompt_tuning_vocab"} <= set(
        paper.METHODS)


def test_one_task_gets_the_papers_grid_per_method():
    grid = sweep(["rte"], paper.METHODS)
    counts = Counter(r.method for r in grid.runs)
    assert counts == {m: PER_TASK[m] for m in paper.METHODS}
    assert len(grid.runs) == sum(PER_TASK[m] for m in paper.METHODS)  # 43 without SAID
    assert not grid.skipped
    names = {m: sorted(r.name for r in grid.runs if r.method == m) for m in counts}
    assert names["compacter"] == sorted(f"rf{rf}_n{n}_lr3e-3" for rf in (32, 16, 8)
                                        for n in (4, 8, 12))
    assert names["adapter"] == ["rf16_lr3e-4", "rf32_lr3e-4", "rf8_lr3e-4"]
    assert names["prompt_tuning_vocab"] == ["lr3e-1"]
    assert all(r.learning_rate == ORIGINAL_LR[r.method] for r in grid.runs)
    compacter = next(r for r in grid.runs
                     if (r.method, r.name) == ("compacter", "rf16_n8_lr3e-3"))
    assert compacter.workdir("runs/paper") == "runs/paper/rte/compacter/rf16_n8_lr3e-3"


def test_the_whole_grid_and_the_low_resource_grid():
    full = sweep(ALL_TASKS, paper.METHODS)
    assert len(full.runs) == len(ALL_TASKS) * sum(PER_TASK[m] for m in paper.METHODS)
    assert len({r.workdir("r") for r in full.runs}) == len(full.runs)

    low = sweep(paper.GLUE_TASKS, paper.LOW_RESOURCE_METHODS,
                train_sizes=paper.LOW_RESOURCE_SIZES)
    # full: 1 + compacter++: 9 configurations, at each size below the training set (RTE 2,490
    # and MRPC 3,668 have no 4,000 run).
    per_task = {t: 10 * sum(n < expected_train(t) for n in (100, 500, 1000, 2000, 4000))
                for t in paper.GLUE_TASKS}
    assert per_task["rte"] == per_task["mrpc"] == 40 and per_task["sst2"] == 50
    assert Counter(r.task for r in low.runs) == per_task
    assert len(low.runs) == 380
    assert {s.split(":")[0] for s in low.skipped} == {"rte train4000", "mrpc train4000"}
    assert all(r.name.endswith(f"_train{r.train_samples}") for r in low.runs)


def test_the_model_decides_which_n_fit():
    # t5-small: d_model 512, bottlenecks 16 / 32 / 64: n = 12 divides none of them.
    grid = sweep(["rte"], ["compacter", "phm_adapter", "adapter"],
                 passthrough=split_extra(["--config.model=random:t5-small"]))
    counts = Counter(r.method for r in grid.runs)
    assert counts == {"compacter": 6, "phm_adapter": 6, "adapter": 3}
    assert all(dict(r.axes)["n"] in (4, 8) for r in grid.runs if r.method != "adapter")
    assert len(grid.skipped) == 6 and all("n=12" in s for s in grid.skipped)
    # A Hub id of a preset reads the preset's sizes.
    assert len(sweep(["rte"], ["compacter"], passthrough=split_extra(
        ["--config.model=google-t5/t5-base"])).runs) == 9


def test_a_hub_id_in_the_local_cache_gives_its_sizes(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--org--t5-512" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(T5_PRESETS["t5-small"].to_hf_dict()))
    (tmp_path / "models--org--t5-512" / "refs").mkdir()
    (tmp_path / "models--org--t5-512" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert paper.model_config("org/t5-512").d_model == 512
    assert len(sweep(["rte"], ["compacter"],
                     passthrough=split_extra(["--config.model=org/t5-512"])).runs) == 6
    with pytest.raises(ValueError, match="cannot read the sizes of model 'org/absent'"):
        paper.model_config("org/absent")


def test_passed_through_flags_pin_axes_and_reach_the_right_methods():
    extra = split_extra(["--config.peft.reduction_factor=16", "--config.learning_rate", "1e-3",
                         "--config.max_steps=10", "--config.peft.rank=1"])
    assert extra.pinned == {"peft.reduction_factor": 16, "learning_rate": 1e-3}
    assert extra.common == ("--config.max_steps=10",)
    grid = sweep(["rte"], ["compacter", "bitfit"], passthrough=extra)
    assert [r.name for r in grid.runs] == ["rf16_n4_lr1e-3", "rf16_n8_lr1e-3",
                                           "rf16_n12_lr1e-3", "lr1e-3"]
    compacter_cmd, bitfit_cmd = (grid.runs[0].command("r", extra.common),
                                 grid.runs[-1].command("r", extra.common))
    assert "--config.peft.rank=1" in compacter_cmd and "--config.max_steps=10" in compacter_cmd
    assert not any("peft" in flag for flag in bitfit_cmd)  # BitFit has no such fields
    assert "--config.max_steps=10" in bitfit_cmd
    rates = sweep(["rte"], ["bitfit"], learning_rates=[1e-4, 3e-4]).runs
    assert [r.name for r in rates] == ["lr1e-4", "lr3e-4"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown argument '--tsks'"):
        split_extra(["--tsks", "rte"])
    with pytest.raises(ValueError, match=r"--config.peft.n='four': expected int"):
        split_extra(["--config.peft.n=four"])
    with pytest.raises(ValueError, match="unknown task 'rtee'"):
        sweep(["rtee"], ["compacter"])
    with pytest.raises(ValueError, match=r"unknown PEFT method 'compacter\+\+\+'"):
        sweep(["rte"], ["compacter+++"])
    with pytest.raises(ValueError, match="paper.py takes 'TASK,METHOD'"):
        paper_config.get_config("rte")
    with pytest.raises(ValueError, match=r"unknown PEFT method 'compacterr'"):
        paper_config.get_config("rte,compacterr")
    # The config is data: the task is checked with the run's other fields, before any load.
    with pytest.raises(ValueError, match="unknown task 'rtee'"):
        validate_config(paper_config.get_config("rtee,compacter"))


def _check_config(run, t5):
    """The run's config as `experiments.glue` parses it; returns it."""
    config = paper_runs.parse_config(run.flags("runs/paper"))
    assert (config.task, config.method) == (run.task, run.method)
    assert config.learning_rate == run.learning_rate
    assert config.train_samples == (run.train_samples or -1)
    assert config.model == "t5-base" and config.fallback_model == ""
    method = peft.get_method(config.method, **finetune.peft_overrides(config))
    assert {k: getattr(method, k) for k, _ in run.axes} == dict(run.axes)
    method.validate(t5)
    return config


def test_every_task_and_method_config_builds_with_its_real_schedule():
    t5 = T5_PRESETS["t5-base"]
    grid = sweep(ALL_TASKS, paper.METHODS).runs
    low = sweep(["rte", "sst2"], paper.LOW_RESOURCE_METHODS,
                train_sizes=paper.LOW_RESOURCE_SIZES).runs
    # Every configuration of every method on RTE, every (task, method) pair's first
    # configuration, every low-resource run of RTE and SST-2 (the schedule depends on the task
    # and size only, the method fields on the method and configuration only).
    checked = [r for r in grid if r.task == "rte"]
    checked += [next(r for r in grid if (r.task, r.method) == (t, m))
                for t in ALL_TASKS for m in paper.METHODS if t != "rte"]
    checked += low
    schedules = {}
    for run in checked:
        config = _check_config(run, t5)
        assert (config.warmup_steps, config.batch_size, config.epochs, config.max_steps) == (
            500, 100, -1, -1)
        n_train = expected_train(run.task, run.train_samples)
        assert paper.paper_train_size(run.task, run.train_samples) == n_train
        # Steps per epoch keep the last partial batch: ceil(n_train / 100).
        per_epoch = data_lib.steps_per_epoch(n_train, config.batch_size)
        assert per_epoch == math.ceil(n_train / 100)
        task = data_lib.get_task(run.task)
        total, epochs = finetune.schedule_length(config, task.is_small, per_epoch)
        assert (total, epochs) == (EPOCHS[run.task] * math.ceil(n_train / 100), EPOCHS[run.task])
        schedules[(run.learning_rate, total)] = config.warmup_steps
    assert len(checked) == (sum(PER_TASK[m] for m in paper.METHODS)
                            + (len(ALL_TASKS) - 1) * len(paper.METHODS) + 90)
    # The schedule itself: warm-up over 500 steps, then linear decay to 0 at the last step
    # (RTE's 500 steps only ramp; CB's 60 ramp to 60/500 of the peak).
    for (lr, total), warmup in sorted(schedules.items()):
        schedule = make_schedule(lr, warmup, total)
        assert float(schedule(0)) == 0.0
        if total > warmup:
            assert float(schedule(warmup)) == pytest.approx(lr, rel=1e-6)
            assert float(schedule(total)) == pytest.approx(0.0, abs=1e-12)
        else:
            assert float(schedule(total - 1)) == pytest.approx(lr * (total - 1) / warmup, rel=1e-5)


def test_train_sizes_match_the_local_files(shared_data):
    source = data_lib.make_source("files", data_dir=None)
    for task in ("cola", "sst2", "mrpc", "stsb", "rte", "cb", "copa"):
        assert len(source.load(task, "train")) == paper.OFFICIAL_TRAIN_SIZES[task], task
    # The large tasks' train part is what split_indices leaves after the 1,000 validation rows.
    plan = data_lib.split_indices("sst2", paper.OFFICIAL_TRAIN_SIZES["sst2"], 872)
    assert len(plan["train"][1]) == paper.paper_train_size("sst2") == 66349


def test_main_prints_commands_and_json(capsys):
    assert paper_runs.main(["--sweep", "--tasks", "rte", "--methods", "compacter++"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 9
    cmd = shlex.split(lines[0])
    assert cmd[:3] == [sys.executable, "-m", "experiments.glue"]
    assert cmd[cmd.index("--workdir") + 1] == "runs/paper/rte/compacter++/rf32_n4_lr3e-3"

    # Without --sweep: one command per (task, method), as before.
    assert paper_runs.main(["--tasks", "rte,cb", "--methods", "bitfit"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [shlex.split(x)[shlex.split(x).index("--workdir") + 1] for x in lines] == [
        "runs/paper/rte/bitfit", "runs/paper/cb/bitfit"]

    assert paper_runs.main(["--low-resource", "--tasks", "cb", "--methods", "bitfit",
                            "--json", "--workdir-root", "w"]) == 0
    grid = json.loads(capsys.readouterr().out)
    # CB has 250 training examples: only the 100-example run is below it.
    assert [(g["name"], g["train_examples"], g["steps"], g["workdir"]) for g in grid] == [
        ("lr3e-4_train100", 100, 20, "w/cb/bitfit/lr3e-4_train100")]
    assert paper_runs.main(["--sweep", "--tasks", "rte", "--bogus"]) == 2


def test_run_skips_finished_runs_and_reports_failures(tmp_path, capsys):
    done, ok, bad = tmp_path / "done", tmp_path / "ok", tmp_path / "bad"
    done.mkdir()
    (done / "summary.json").write_text("{}")
    touch = "import pathlib, sys; pathlib.Path(sys.argv[1]).mkdir(); sys.exit(int(sys.argv[2]))"
    cmds = [(str(done), [sys.executable, "-c", touch, str(done / "ran"), "0"]),
            (str(bad), [sys.executable, "-c", touch, str(bad), "3"]),
            (str(ok), [sys.executable, "-c", touch, str(ok), "0"])]
    assert paper_runs.run_all(cmds) == 1
    assert not (done / "ran").exists() and ok.is_dir() and bad.is_dir()
    err = capsys.readouterr().err
    assert f"done, skipped: {done}" in err and f"1 run(s) failed:\n{bad}" in err


def test_sparse_adapter_and_dsee_rows_join_the_grid():
    """SparseAdapter (issue 21) runs the adapter's bottleneck sweep; Large-Sparse twice each
    bottleneck, so every configuration has its dense counterpart's weight budget."""
    grid = sweep(["rte"], paper.EXTRA_METHODS)
    factors = {m: sorted(dict(r.axes).get("reduction_factor") for r in grid.runs
                         if r.method == m and r.axes)
               for m in paper.EXTRA_METHODS}
    assert factors == {"sparse_adapter": [8, 16, 32], "large_sparse_adapter": [4, 8, 16],
                       "dsee": []}
    assert [r.learning_rate for r in grid.runs if r.method == "dsee"] == [5e-4]  # rate only
    assert all(m in paper.METHOD_TITLES for m in paper.EXTRA_METHODS)


@pytest.mark.parametrize("argv, named", [
    (["--train-sizes=-5,0"], "argument --train-sizes: '-5' is not valid"),
    (["--sweep", "--learning-rates=0,-1"], "argument --learning-rates: '0' is not valid"),
    (["--sweep", "--learning-rates", "abc"], "argument --learning-rates: 'abc' is not valid"),
    (["--sweep", "--learning-rates=nan"], "argument --learning-rates: 'nan' is not valid"),
])
def test_grid_values_no_run_can_use_exit_2_naming_the_flag(argv, named, capsys):
    """A size <= 0 would train on the whole set under a low-resource name; a rate <= 0 fails
    every run: both are refused before any command is printed."""
    with pytest.raises(SystemExit) as exit_:
        paper_runs.main(["--tasks", "rte", "--methods", "bitfit", *argv])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and named in err and out == ""


def test_one_command_per_task_and_method_checks_names_and_flags_first(capsys):
    for argv, named in ((["--tasks", "rtee"], "unknown task 'rtee'"),
                        (["--methods", "bitfitt"], "unknown PEFT method 'bitfitt'"),
                        (["--tsks", "rte"], "unknown argument '--tsks'"),
                        (["--config.learning_rate=0"], "--config.learning_rate=0: expected")):
        assert paper_runs.main(argv) == 2
        out, err = capsys.readouterr()
        assert named in err and out == "", argv


def test_pinned_sizes_and_rates_are_checked_and_minus_one_is_the_full_set(capsys):
    assert paper_runs.main(["--sweep", "--tasks", "rte", "--methods", "bitfit",
                            "--config.learning_rate=-1"]) == 2
    assert "--config.learning_rate=-1: expected a positive finite rate" in capsys.readouterr().err
    assert paper_runs.main(["--sweep", "--tasks", "rte", "--methods", "bitfit",
                            "--config.train_samples=0"]) == 2
    assert "--config.train_samples=0: expected a positive number" in capsys.readouterr().err
    (run,) = sweep(["rte"], ["bitfit"],
                   passthrough=split_extra(["--config.train_samples=-1"])).runs
    assert run.train_samples is None and run.name == "lr3e-4"
    with pytest.raises(ValueError, match="training-set size -5: expected a positive number"):
        sweep(["rte"], ["bitfit"], train_sizes=[-5])
    with pytest.raises(ValueError, match=r"learning rate 0\.0: expected a positive finite"):
        sweep(["rte"], ["bitfit"], learning_rates=[0.0])


def test_dp_epsilons_add_private_runs_whose_commands_parse(capsys):
    """`--dp-epsilons 3` adds to every configuration its DP run: its own workdir, the target
    epsilon, padded batches, the `--config.dp.*` flags (DP runs only); the glue CLI's config
    parser reads the command and the spec's checks accept it."""
    assert paper_runs.main(["--dp-epsilons", "3", "--tasks", "sst2", "--methods", "lora",
                            "--config.model=t5-mini-glue", "--config.dp.clip_norm=0.5"]) == 0
    plain, private = (shlex.split(x) for x in capsys.readouterr().out.strip().splitlines())
    assert plain[plain.index("--workdir") + 1] == "runs/paper/sst2/lora/lr1e-3"
    assert private[private.index("--workdir") + 1] == "runs/paper/sst2/lora/lr1e-3_dp-eps3"
    assert not any("dp." in t or "packing" in t for t in plain)
    assert {"--config.dp.epsilon=3", "--config.packing=False",
            "--config.dp.clip_norm=0.5"} <= set(private)
    plain_config = paper_runs.parse_config(plain[3:])
    config = paper_runs.parse_config(private[3:])
    assert config.dp.epsilon == 3.0 and config.packing is False and config.dp.clip_norm == 0.5
    assert config.dp.delta is None  # the DP code's rule, 1 / N**1.1
    assert plain_config.dp.epsilon is None and plain_config.dp.clip_norm == 1.0
    assert config.model == "t5-mini-glue" and config.task == "sst2" and config.method == "lora"
    validate_config(config)
    assert spec_lib.dp_enabled(config) and not spec_lib.dp_enabled(plain_config)
    # A pinned target epsilon: the DP runs only.
    (run,) = sweep(["rte"], ["bitfit"], passthrough=split_extra(["--config.dp.epsilon=8"])).runs
    assert run.dp_epsilon == 8.0 and run.name == "lr3e-4_dp-eps8"
    assert [r.name for r in sweep(["rte"], ["bitfit"], dp_epsilons=[0.5, 8]).runs] == [
        "lr3e-4", "lr3e-4_dp-eps0.5", "lr3e-4_dp-eps8"]


@pytest.mark.parametrize("argv, named", [
    (["--dp-epsilons=0"], "argument --dp-epsilons: '0' is not valid"),
    (["--dp-epsilons=-1"], "argument --dp-epsilons: '-1' is not valid"),
    (["--dp-epsilons", "abc"], "argument --dp-epsilons: 'abc' is not valid"),
    (["--dp-epsilons=3,nan"], "argument --dp-epsilons: 'nan' is not valid"),
])
def test_dp_epsilons_no_run_can_use_exit_2_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        paper_runs.main(["--tasks", "rte", "--methods", "bitfit", *argv])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and named in err and out == ""


def test_dp_runs_refuse_packing_and_a_fixed_noise(capsys):
    for argv, named in ((["--dp-epsilons=3", "--config.packing=True"],
                         "--config.packing=True: differentially private runs"),
                        (["--sweep", "--config.dp.noise_multiplier=1.0"],
                         "--config.dp.noise_multiplier: the grid's DP runs"),
                        (["--config.dp.epsilon=inf"], "--config.dp.epsilon=inf: expected"),
                        (["--config.dp.epsilon=3", "--dp-epsilons=8"], "set one")):
        assert paper_runs.main(["--tasks", "rte", "--methods", "bitfit", *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert named in err and out == "", argv
    with pytest.raises(ValueError, match=r"target epsilon nan: expected a positive finite"):
        sweep(["rte"], ["bitfit"], dp_epsilons=[float("nan")])
