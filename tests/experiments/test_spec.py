"""experiments.spec: one schema per run, checked up front. An unknown field names the valid
ones, a missing one is named before any backbone or corpus loads, bad values name the field and
the fix, and every sentinel (-1 / "" / 0 / None) is resolved there."""

from __future__ import annotations

import pytest

from experiments import finetune, multitask, pretrain, spec
from experiments.configs import glue as glue_config
from experiments.configs import multitask as multitask_config
from experiments.configs import pretrain as pretrain_config
from experiments.spec import ConfigError


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a run gets as far as a backbone, a tokenizer or a corpus."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before the config was checked")
    for module, name in [(finetune, "resolve_model"), (pretrain, "build_documents"),
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
    c = glue(task="rte", learning_rate=None, add_task_prefix=None, epochs=-1, max_steps=-1,
             eval_every=-1, save_every=-1, num_devices=-1, clip_norm=1.0)
    s = spec.finetune_spec(c)
    assert s.learning_rate == s.method.learning_rate and s.add_task_prefix is False
    assert (s.epochs, s.max_steps, s.eval_every, s.save_every, s.devices) == (None,) * 5
    assert s.schedule(task_is_small=True, steps_per_epoch=5) == (100, 20)
    assert s.schedule(task_is_small=False, steps_per_epoch=5) == (15, 3)
    assert (s.eval_period(5), s.save_period(5), s.clip_norm) == (5, 5, 1.0)
    c.update(dict(epochs=2, max_steps=7, eval_every=0, learning_rate=0.1, clip_norm=0.0))
    c.dp.noise_multiplier = None
    s = spec.finetune_spec(c)
    assert s.schedule(True, 5) == (7, 2) and (s.eval_period(5), s.save_period(5)) == (0, 5)
    assert s.learning_rate == 0.1 and s.clip_norm is None
    c.update(dict(epochs=-1, max_steps=7, clip_norm=1.0))
    c.dp.noise_multiplier = 1.0  # DP clips each example's gradient: no global clip
    s = spec.finetune_spec(c)
    assert s.schedule(True, 5) == (7, 20) and s.dp and s.clip_norm is None
