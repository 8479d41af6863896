"""End-to-end fine-tuning on the real RTE files with a tiny random T5 (experiments.finetune)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from compacter_jax import peft
from compacter_jax.models import greedy_generate, unstack_blocks
from experiments import finetune
from experiments.configs.glue import get_config


def tiny_config(**overrides):
    c = get_config()
    c.task = "rte"
    c.model = "random:t5-tiny"
    c.fallback_model = ""
    c.peft.reduction_factor = 8  # t5-tiny: d_model 64 -> bottleneck 8, divisible by n = 4
    c.max_source_length = 64
    c.batch_size = 8
    c.eval_batch_size = 16
    c.max_eval_samples = 16
    c.learning_rate = 1e-2
    c.warmup_steps = 2
    c.max_steps = 16
    c.eval_every = 8
    c.log_every = 2
    c.num_devices = 1
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def read_events(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rte")
    summary = finetune.train_and_evaluate(tiny_config(), workdir)
    return workdir, summary


def test_loss_falls_and_everything_is_written(finished_run):
    workdir, summary = finished_run
    losses = [e["train/loss"] for e in read_events(workdir) if "train/loss" in e]
    assert len(losses) == 8  # one event per log_every=2 of 16 steps
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.1, losses
    evals = [e for e in read_events(workdir) if "validation/score" in e]
    assert [e["step"] for e in evals] == [8, 16]
    assert {"validation/accuracy", "validation/num_invalid"} <= set(evals[0])
    assert "test" in summary and "accuracy" in summary["test"]
    assert summary["trainable_params"] == peft.count(peft.load_trainable(workdir / "adapter")[0])
    assert (workdir / "checkpoints" / "steps" / "16").is_dir()
    assert (workdir / "learning_curves.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").iterdir())
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 16


def test_exported_adapter_reloads_onto_the_backbone(finished_run, shared_data):
    workdir, _ = finished_run
    trained, meta = peft.load_trainable(workdir / "adapter")
    assert meta["method"]["name"] == "compacter++" and meta["task"] == "rte"
    # The run drew random:t5-tiny scanned (the config's default); drawn unscanned it has other
    # weights, which the export's backbone fingerprint catches (it used to load silently).
    with pytest.raises(peft.AdapterFileError, match="drawn with scan_layers=True.*pass "
                                                    "scan_layers=True"):
        peft.load_adapter(workdir / "adapter")
    model, params = peft.load_adapter(workdir / "adapter", scan_layers=True)
    flat_loaded = jax.tree_util.tree_leaves(
        unstack_blocks(peft.method_of_export(meta).partition(params)[0]))
    for got, want in zip(flat_loaded, jax.tree_util.tree_leaves(trained)):
        np.testing.assert_array_equal(np.asarray(got), want)
    ids = np.ones((2, 6), np.int32)
    out = greedy_generate(model, params, ids, np.ones_like(ids), max_new_tokens=3)
    assert out.shape == (2, 3)


def test_compacterpp_t5_base_export_is_under_1mb(tmp_path):
    shapes = jax.eval_shape(lambda: peft.from_pretrained(
        "random:t5-base", "compacter++", scan_layers=True)[1])
    method = peft.get_method("compacter++")
    trainable, _ = method.partition(shapes)
    zeros = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), trainable)
    with pytest.warns(UserWarning, match="records the backbone by name only"):
        path = peft.save_adapter(tmp_path / "adapter", zeros, method, model="t5-base")
    size = sum(f.stat().st_size for f in path.iterdir())
    assert peft.count(trainable) == 104_704
    assert size < 1_000_000, size


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_result(shared_data, tmp_path, monkeypatch):
    config = tiny_config(max_steps=12, eval_every=4, save_every=4)
    straight = finetune.train_and_evaluate(config, tmp_path / "straight")

    real_batches = finetune.data_lib.train_batches

    def crashing_batches(*args, **kwargs):
        for i, item in enumerate(real_batches(*args, **kwargs)):
            if i == 6:  # dies during step 7: the last checkpoint is step 4
                raise Interrupt
            yield item

    monkeypatch.setattr(finetune.data_lib, "train_batches", crashing_batches)
    with pytest.raises(Interrupt):
        finetune.train_and_evaluate(config, tmp_path / "resumed")
    monkeypatch.setattr(finetune.data_lib, "train_batches", real_batches)
    resumed = finetune.train_and_evaluate(config, tmp_path / "resumed")

    assert resumed["test"] == straight["test"]
    assert resumed["best_step"] == straight["best_step"]
    a, _ = peft.load_trainable(tmp_path / "straight" / "adapter")
    b, _ = peft.load_trainable(tmp_path / "resumed" / "adapter")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    loss = lambda d: {e["step"]: e["train/loss"] for e in read_events(d) if "train/loss" in e}
    assert loss(tmp_path / "resumed") == loss(tmp_path / "straight")
