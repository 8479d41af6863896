"""experiments.small_scale: the grid's commands (slices, the frozen-backbone methods' rate
scale) and the random control backbone, which must carry the pretrained one's tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

import jax

from compacter_jax.models import T5Config, T5ForConditionalGeneration, init_params, save_pretrained
from compacter_jax.models.config import PRESETS
from experiments import run_results, small_scale


def _flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--config.") and "=" in a)


def test_slices_and_the_rate_scale_reach_the_commands(tmp_path):
    args = small_scale.build_parser().parse_args([
        "--groups", "main,control", "--tasks", "sst2,rte",
        "--methods", "full,compacter++,lora,prompt_tuning",
        "--lr-scale", "10", "--steps", "300", "--workdir-root", str(tmp_path)])
    cmds = small_scale.plan(args)
    runs = {tuple(workdir.split("/")[-3:]): _flags(cmd) for workdir, cmd in cmds}
    assert sorted(runs) == sorted(
        [("main", t, m) for t in ("sst2", "rte")
         for m in ("full", "compacter++", "lora", "prompt_tuning")]
        + [("control", t, m) for t in ("sst2", "rte") for m in ("full", "compacter++")])
    for (group, task, method), flags in runs.items():
        assert flags["config.task"] == task and flags["config.method"] == method
        assert flags["config.max_steps"] == "300" and flags["config.warmup_steps"] == "30"
        # The embedded backbone's rule (spec): full fine-tuning keeps the paper's rate, and so
        # does prompt tuning (3e-1, already large); the other frozen-backbone methods scale.
        scaled = method not in ("full", "prompt_tuning")
        assert flags.get("config.learning_rate_scale") == ("10.0" if scaled else None)
    default = small_scale.plan(small_scale.build_parser().parse_args(
        ["--groups", "main", "--workdir-root", str(tmp_path)]))
    assert len(default) == len(small_scale.TASKS) * len(small_scale.METHODS)
    assert not any("learning_rate_scale" in " ".join(cmd) for _, cmd in default)


def test_random_backbone_has_the_shape_and_the_tokenizer_of_the_backbone(tmp_path):
    config = PRESETS["t5-tiny"]
    backbone = save_pretrained(tmp_path / "pretrained", config, init_params(
        T5ForConditionalGeneration(config), jax.random.PRNGKey(1)))
    (backbone / "spiece.model").write_bytes(b"the backbone's own vocabulary")
    out = small_scale.random_backbone(backbone, tmp_path / "runs")
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (backbone / "config.json").read_text())
    assert (out / "spiece.model").read_bytes() == b"the backbone's own vocabulary"
    assert T5Config.from_hf_dict(json.loads((out / "config.json").read_text())) == config


def test_sizes_and_seeds_reach_the_commands_and_the_recipe_seed_keeps_its_workdir(tmp_path):
    args = small_scale.build_parser().parse_args([
        "--groups", "low_resource,control", "--tasks", "stsb", "--methods", "compacter++",
        "--sizes", "100,2000", "--seeds", f"{small_scale.DEFAULT_SEED},7",
        "--workdir-root", str(tmp_path)])
    runs = {workdir[len(str(tmp_path)) + 1:]: _flags(cmd)
            for workdir, cmd in small_scale.plan(args)}
    assert sorted(runs) == sorted([
        "low_resource/stsb/compacter++/train100", "low_resource/stsb/compacter++/train2000",
        "control/stsb/compacter++", "low_resource/stsb/compacter++/train100/seed7",
        "low_resource/stsb/compacter++/train2000/seed7", "control/stsb/compacter++/seed7"])
    for workdir, flags in runs.items():
        assert flags.get("config.seed") == ("7" if workdir.endswith("seed7") else None)
        if "train" in workdir:
            assert flags["config.train_samples"] == workdir.split("/")[3][len("train"):]
    with pytest.raises(SystemExit):
        small_scale.build_parser().parse_args(["--sizes", "100,0"])
    with pytest.raises(SystemExit):
        small_scale.build_parser().parse_args(["--seeds", "-1"])


def _summary(path, seed, validation, accuracy, train_samples=-1, method="compacter++"):
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "task": "mrpc", "method": method, "model": "/m/t5-mini-glue", "trainable_params": 1,
        "total_params": 2, "best_validation_score": validation,
        "test": {"accuracy": accuracy, "f1": accuracy + 2.0},
        "config": {"seed": seed, "train_samples": train_samples}}))


def test_seed_records_give_mean_and_sample_sd_over_seeds(tmp_path):
    for seed, val, acc in ((42, 70.0, 60.0), (1, 74.0, 66.0), (2, 72.0, 69.0)):
        _summary(tmp_path / f"s{seed}", seed, val, acc)
    _summary(tmp_path / "small", 42, 65.0, 50.0, train_samples=100)
    _summary(tmp_path / "full", 42, 80.0, 75.0, method="full")
    runs, unreadable = run_results.read_runs(tmp_path)
    assert not unreadable
    records = {(r["method"], r["train_samples"]): r for r in small_scale.seed_records(runs)}
    three = records[("compacter++", "")]
    tests = np.array([60.0, 66.0, 69.0]) + 1.0  # MRPC's score: mean of accuracy and F1
    assert three["n"] == 3 and sorted(three["seeds"].split(",")) == ["1", "2", "42"]
    assert three["validation_mean"] == pytest.approx(72.0)
    assert three["validation_sd"] == pytest.approx(2.0)  # sqrt(((-2)^2 + 2^2 + 0) / 2)
    assert three["test_mean"] == pytest.approx(tests.mean())
    assert three["test_sd"] == pytest.approx(np.sqrt(((tests - tests.mean()) ** 2).sum() / 2))
    assert records[("compacter++", 100)]["validation_sd"] is None
    assert records[("full", "")]["n"] == 1
    table = small_scale.seeds_markdown(small_scale.seed_records(runs))
    assert "| mrpc | compacter++ | all | t5-mini-glue | " in table and "72.0 ± 2.0" in table
