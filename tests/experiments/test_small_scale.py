"""experiments.small_scale: the grid's commands (slices, the frozen-backbone methods' rate
scale) and the random control backbone, which must carry the pretrained one's tokenizer."""

from __future__ import annotations

import json

import jax

from compacter_jax.models import T5Config, T5ForConditionalGeneration, init_params, save_pretrained
from compacter_jax.models.config import PRESETS
from experiments import small_scale


def _flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--config.") and "=" in a)


def test_slices_and_the_rate_scale_reach_the_commands(tmp_path):
    args = small_scale.build_parser().parse_args([
        "--groups", "main,control", "--tasks", "sst2,rte", "--methods", "full,compacter++,lora",
        "--lr-scale", "10", "--steps", "300", "--workdir-root", str(tmp_path)])
    cmds = small_scale.plan(args)
    runs = {tuple(workdir.split("/")[-3:]): _flags(cmd) for workdir, cmd in cmds}
    assert sorted(runs) == sorted(
        [("main", t, m) for t in ("sst2", "rte") for m in ("full", "compacter++", "lora")]
        + [("control", t, m) for t in ("sst2", "rte") for m in ("full", "compacter++")])
    for (group, task, method), flags in runs.items():
        assert flags["config.task"] == task and flags["config.method"] == method
        assert flags["config.max_steps"] == "300" and flags["config.warmup_steps"] == "30"
        # Full fine-tuning keeps the paper's rate; every frozen-backbone method is scaled.
        assert flags.get("config.learning_rate_scale") == (None if method == "full" else "10.0")
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
