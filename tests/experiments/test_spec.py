"""experiments.spec: one schema per run, checked up front. An unknown field names the valid
ones, a missing one is named before any backbone or corpus loads, bad values name the field and
the fix, and every sentinel (-1 / "" / 0 / None) is resolved there."""

from __future__ import annotations

import numpy as np
import pytest

from compacter_jax import data as data_lib
from compacter_jax import peft
from experiments import backbone, finetune, multitask, pretrain, spec
from experiments.configs import glue as glue_config
from experiments.configs import multitask as multitask_config
from experiments.configs import pretrain as pretrain_config
from experiments.spec import ConfigError


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a run gets as far as a backbone, a tokenizer or a corpus."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before the config was checked")
    for module, name in [(backbone, "resolve_model"), (pretrain, "build_documents"),
                         (pretrain, "build_tokenizer")]:
        monkeypatch.setattr(module, name, refuse)


def glue(**fields):
    c = glue_config.get_config()
    c.model, c.num_devices = "random:t5-tiny", 1
    c.update(fields)
    return c


def test_an_unknown_field_names_the_valid_ones(tmp_path, nothing_loads):
    c = glue()
    c.bogus = 3
    c.peft.foo = 1
    with pytest.raises(ConfigError) as e:
        finetune.train_and_evaluate(c, tmp_path)
    message = str(e.value)
    assert "--config.peft.foo: config.peft has no field 'foo'; valid fields: alpha" in message
    assert "--config.bogus: config has no field 'bogus'; valid fields: add_task_prefix" in message
    assert not (tmp_path / ".lock").exists()  # refused before the workdir was claimed


def test_multitask_refuses_a_task_field(tmp_path, nothing_loads):
    c = multitask_config.get_config()
    c.task = "rte"  # silently ignored before issue 19
    with pytest.raises(ConfigError, match=r"--config.task: config has no field 'task'; "
                                          r"valid fields: .*tasks"):
        multitask.train_and_evaluate(c, tmp_path)


def test_a_missing_field_is_named_before_the_backbone_loads(tmp_path, nothing_loads):
    c = glue()
    del c["eval_mode"]
    with pytest.raises(ConfigError) as e:
        finetune.train_and_evaluate(c, tmp_path)
    assert str(e.value).startswith("--config.eval_mode is missing from the config")
    assert "batch_size" not in str(e.value)  # only the field at fault


def test_unknown_overrides_are_explained_with_the_valid_fields():
    c = glue_config.get_config()
    assert spec.unknown_override(c, "seed") is None
    assert spec.unknown_override(c, "peft.n") is None
    assert spec.unknown_override(c, "bogus.x").startswith(
        "--config.bogus.x: config has no field 'bogus'; valid fields: add_task_prefix")
    assert spec.unknown_override(c, "seed.x") == "--config.seed.x: config.seed has no field 'x'"


def tiny_pretrain(**fields):
    c = pretrain_config.get_config("tiny")
    for k, v in fields.items():
        target = c.model if k.startswith("model.") else c
        setattr(target, k.removeprefix("model."), v)
    return c


@pytest.mark.parametrize("fields, message", [
    ({"noise_density": 1.5}, r"--config.noise_density=1.5: must be in \(0, 1\)"),  # hung
    ({"batch_size": -4}, r"--config.batch_size=-4: must be a positive integer"),
    ({"model.d_model": 10**9}, r"--config.model.d_model=1000000000: must be an integer in "
                               r"1..32,768"),
    ({"model.d_model": 1 << 15, "model.d_ff": 1 << 18, "model.num_layers": 256},  # > 1e11
     r"--config.model \(d_model=32768, d_ff=262144, num_layers=256.*use smaller"),
    ({"num_train_steps": 0}, r"--config.num_train_steps must be positive"),
    ({"mean_noise_span_length": 0.0}, r"--config.mean_noise_span_length=0.0: must be 1 or more"),
    ({"optimizer": "sgd"}, r"--config.optimizer='sgd': use one of adamw, adafactor"),
])
def test_bad_pretraining_values_are_refused_before_the_corpus(fields, message, tmp_path,
                                                               nothing_loads):
    with pytest.raises(ConfigError, match=message):
        pretrain.train_and_evaluate(tiny_pretrain(**fields), tmp_path)


def test_a_model_that_cannot_fit_the_device_is_refused():
    sizes = dict(pretrain_config.get_config("tiny").model)  # d 64, ff 128, 2 x 16 heads, 1+1
    embedding = 32100 * 64                                    # tied: stored once
    encoder = 4 * 64 * 32 + 2 * 64 * 128 + 2 * 64 + 64        # attention, relu FF, norms
    decoder = 2 * 4 * 64 * 32 + 2 * 64 * 128 + 3 * 64 + 64
    total = embedding + encoder + decoder + 2 * 32 * 2        # + relative attention biases
    need = 16 * total  # float32 value, gradient and two AdamW moments
    assert spec.check_model_sizes(sizes, 32100, memory=need) == total
    with pytest.raises(ConfigError, match=r"2,112,320 parameters: training needs about "
                                          r"0.0315 GiB, more than the 0.0315 GiB"):
        spec.check_model_sizes(sizes, 32100, memory=need - 1)


def test_pretraining_sentinels_are_resolved():
    s = spec.pretrain_spec(tiny_pretrain())
    assert (s.total_steps, s.stop_at_most, s.export_dir, s.tasks) == (12, None, None,
                                                                       ("cb", "copa"))
    assert s.vocab_size == 32128 and s.clip_norm == 1.0
    s = spec.pretrain_spec(tiny_pretrain(stop_after=5, vocab_size=0, clip_norm=0.0, tasks="",
                                         export_dir="/x"))
    assert (s.stop_at_most, s.vocab_size, s.clip_norm, s.tasks, s.export_dir) == (
        5, None, None, None, "/x")


def test_finetuning_sentinels_are_resolved():
    c = glue(task="rte", learning_rate=None, learning_rate_scale=None, add_task_prefix=None,
             epochs=-1, max_steps=-1, eval_every=-1, save_every=-1, num_devices=-1,
             clip_norm=1.0)
    s = spec.finetune_spec(c)
    assert s.learning_rate_for(None) == s.method.learning_rate and s.add_task_prefix is False
    assert (s.epochs, s.max_steps, s.eval_every, s.save_every, s.devices) == (None,) * 5
    assert s.schedule(task_is_small=True, steps_per_epoch=5) == (100, 20)
    assert s.schedule(task_is_small=False, steps_per_epoch=5) == (15, 3)
    assert (s.eval_period(5), s.save_period(5), s.clip_norm) == (5, 5, 1.0)
    c.update(dict(epochs=2, max_steps=7, eval_every=0, learning_rate=0.1, clip_norm=0.0))
    c.dp.noise_multiplier = None
    s = spec.finetune_spec(c)
    assert s.schedule(True, 5) == (7, 2) and (s.eval_period(5), s.save_period(5)) == (0, 5)
    assert s.learning_rate_for(None) == 0.1 and s.clip_norm is None
    c.update(dict(epochs=-1, max_steps=7, clip_norm=1.0))
    c.dp.noise_multiplier = 1.0  # DP clips each example's gradient: no global clip
    s = spec.finetune_spec(c)
    assert s.schedule(True, 5) == (7, 20) and s.dp and s.clip_norm is None


def test_learning_rate_scale_is_the_backbones_unless_set(tmp_path):
    # Unset (the quick config, make run): 10x the method's rate on the embedded t5-mini-glue
    # (by name or by its folder), the method's own on any other model; the paper's recipe and
    # an explicit scale apply to every model; an explicit learning_rate is taken as it is.
    from compacter_jax.paths import checkpoints_dir

    embedded = checkpoints_dir() / "t5-mini-glue"
    quick = spec.finetune_spec(glue(task="sst2", method="compacter++"))
    assert quick.base_learning_rate == 3e-3 and quick.learning_rate_scale is None
    assert quick.learning_rate_for(embedded) == pytest.approx(3e-2, rel=1e-12)
    link = tmp_path / "mini"
    link.symlink_to(embedded)
    assert quick.learning_rate_for(link) == pytest.approx(3e-2, rel=1e-12)
    assert quick.learning_rate_for(tmp_path) == quick.learning_rate_for(None) == 3e-3
    paper = glue_config.get_config("paper")
    paper.model, paper.num_devices = "random:t5-tiny", 1
    assert spec.finetune_spec(paper).learning_rate_for(embedded) == 3e-3
    scaled = spec.finetune_spec(glue(learning_rate_scale=2.0))
    assert scaled.learning_rate_for(None) == scaled.learning_rate_for(embedded) == 6e-3
    fixed = spec.finetune_spec(glue(learning_rate=1e-4, learning_rate_scale=2.0))
    assert fixed.learning_rate_for(embedded) == 1e-4
    # Full fine-tuning learns at its own rate there; prompt tuning's is already 3e-2 / 3e-1.
    for method, rate in [("full", 3e-4), ("prompt_tuning", 3e-2), ("prompt_tuning_vocab", 3e-1),
                         ("lora", 10 * peft.get_method("lora").learning_rate)]:
        got = spec.finetune_spec(glue(method=method)).learning_rate_for(embedded)
        assert got == pytest.approx(rate, rel=1e-12), method


@pytest.mark.parametrize("fields, message", [
    ({"learning_rate_scale": 0.0}, r"--config.learning_rate_scale=0.0: must be a positive"),
    ({"packing_row_buckets": 0}, r"--config.packing_row_buckets=0: must be a positive"),
    ({"packing_target_buckets": -1}, r"--config.packing_target_buckets=-1: must be 0 \(one"),
])
def test_bad_rate_scale_and_packing_shapes_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        finetune.check_config(glue(**fields))


def test_packing_shape_fields_bound_the_plans_shapes():
    """`packing_row_buckets` / `packing_target_buckets` reach `plan_packing`: at most N row
    counts, and 0 target buckets = one target length for every batch."""
    rng = np.random.default_rng(0)
    n, width = 400, 48
    src = rng.integers(4, width + 1, n)
    tgt = rng.integers(1, 4, n)
    data = data_lib.EncodedData(
        data_lib.get_task("sst2"), np.ones((n, width), np.int32),
        (np.arange(width) < src[:, None]).astype(np.int32), np.ones((n, 4), np.int32),
        (np.arange(4) < tgt[:, None]).astype(np.int32), (0,) * n, (None,) * n, 0, 0)
    method = peft.get_method("compacter++")
    wide = finetune.packing_plan(glue(), method, data, num_epochs=2, num_devices=1)
    narrow = finetune.packing_plan(glue(packing_row_buckets=1, packing_target_buckets=0),
                                   method, data, num_epochs=2, num_devices=1)
    default = finetune.packing_plan(glue_config.get_config("paper"), method, data,
                                    num_epochs=2, num_devices=1)
    assert len(default.row_buckets) > 2 and len(default.target_buckets) > 0
    assert len(wide.row_buckets) <= 2 and wide.target_buckets == ()  # the quick config's
    assert len(narrow.row_buckets) == 1 and narrow.target_buckets == ()
    shapes = {narrow.pack(b)["labels"].shape
              for b, _ in data_lib.train_batches(data, 32, seed=42, num_epochs=2)}
    assert len(shapes) == 1
