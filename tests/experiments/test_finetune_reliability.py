"""experiments.finetune end to end on faults (issue 12): a corrupt newest checkpoint, a torn
metrics line and a killed export are survived with the uninterrupted result; a diverged run
leaves no checkpoint to resume; the data_dir is honoured under source=auto; only the default
model falls back."""

from __future__ import annotations

import json
import shutil

import jax
import orbax.checkpoint as ocp
import pytest

from compacter_jax import peft
from compacter_jax.models.hf_io import ModelNotCachedError
from compacter_jax.train import NonFiniteLossError
from compacter_jax.train.checkpoint import Checkpointer, NonFiniteStateError, nonfinite_leaves
from experiments import backbone, finetune
from tiny_runs import fast_compiles, reference_run, tiny_config


@pytest.fixture(scope="module")
def compile_cache():
    with fast_compiles():
        yield


@pytest.fixture(scope="module")
def finished(shared_data, tmp_path_factory, compile_cache):
    return reference_run(tmp_path_factory)


def records(workdir):
    out = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in out]


@pytest.mark.slow
def test_corrupt_checkpoint_torn_metrics_and_stray_export_are_survived(finished, tmp_path):
    straight, summary = finished
    workdir = tmp_path / "damaged"
    shutil.copytree(straight, workdir)
    for f in (workdir / "checkpoints" / "steps" / "4" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated newest step
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')                         # killed mid-line
    (workdir / "adapter.tmp-99999").mkdir()                        # killed mid-export

    resumed = finetune.train_and_evaluate(tiny_config(), workdir)  # resumes at step 2

    assert resumed["test"] == summary["test"] and resumed["best_step"] == summary["best_step"]
    assert (workdir / "adapter" / "trainable.safetensors").read_bytes() == (
        straight / "adapter" / "trainable.safetensors").read_bytes()
    assert records(workdir) == records(straight)  # steps 3-4 once each, no torn line
    assert len(resumed["warnings"]) == 1 and "steps/4 is unusable" in resumed["warnings"][0]
    assert [p.name.split("-")[:2] for p in (workdir / "checkpoints" / "set_aside").iterdir()] \
        == [["steps", "4"]]
    assert not list(workdir.glob("adapter.tmp-*"))


@pytest.mark.slow
def test_a_diverged_run_leaves_nothing_non_finite_to_resume(shared_data, tmp_path,
                                                            compile_cache):
    config = tiny_config(learning_rate=3e38, warmup_steps=0, clip_norm=0.0, save_every=1,
                         eval_every=0, max_steps=3)
    with pytest.raises((NonFiniteLossError, NonFiniteStateError)):
        finetune.train_and_evaluate(config, tmp_path)
    left = [p for p in (tmp_path / "checkpoints" / "steps").iterdir() if p.name.isdigit()]
    for step_dir in left:  # what is on disk, read without a template
        state = ocp.StandardCheckpointer().restore(step_dir / "state")
        assert not nonfinite_leaves(state), step_dir
    # The state a non-finite loss was computed from diverged: it is set aside, not resumed.
    aside = sorted(p.name.split("-")[1] for p in (tmp_path / "checkpoints" / "set_aside").iterdir())
    assert aside and not left, (aside, left)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() is None


def test_data_dir_is_read_with_source_auto(shared_data, tmp_path, tokenizer):
    root = tmp_path / "data"
    (root / "glue" / "RTE").mkdir(parents=True)
    for split in ("dev", "test"):
        shutil.copy(shared_data / "glue" / "RTE" / f"{split}.tsv", root / "glue" / "RTE")
    lines = (shared_data / "glue" / "RTE" / "train.tsv").read_text().splitlines()
    (root / "glue" / "RTE" / "train.tsv").write_text("\n".join(lines[:31]) + "\n")  # 30 rows
    config = tiny_config(data_dir=str(root), train_samples=-1)
    assert config.source == "auto"
    encoded = finetune.load_data(config, finetune.data_lib.get_task("rte"), tokenizer, False)
    assert len(encoded["train"]) == 30


def test_only_the_default_model_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    method = peft.get_method("compacter++", reduction_factor=8)
    rng = jax.random.PRNGKey(0)
    default = tiny_config(model="t5-base", fallback_model="random:t5-tiny")
    with pytest.warns(UserWarning, match="FALLING BACK TO random:t5-tiny"):
        _, _, name = backbone.load_model(default, method, rng)
    assert name == "random:t5-tiny"
    for model, error in (("t5-large", ModelNotCachedError), (str(tmp_path), FileNotFoundError),
                         (str(tmp_path / "missing"), FileNotFoundError)):
        with pytest.raises(error):
            backbone.load_model(tiny_config(model=model, fallback_model="random:t5-tiny"),
                                method, rng)
