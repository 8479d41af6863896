"""DP fine-tuning through the CLI's entry (`experiments.glue.run`): a 3-step Compacter++ run on
a tiny random T5 writes the (epsilon, delta) spent at every evaluation and in summary.json, the
calibrated noise keeps the run within its target, and bad `--config.dp.*` values exit 2."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
from tiny_runs import fast_compiles

from compacter_jax.train import privacy
from experiments import dp as dp_run
from experiments import glue
from experiments.configs.glue import get_config


def tiny(**overrides):
    c = get_config()
    c.task, c.model, c.fallback_model = "rte", "random:t5-tiny", ""
    c.peft.reduction_factor = 8
    c.max_source_length, c.batch_size, c.eval_batch_size = 32, 8, 8
    c.max_eval_samples, c.num_devices, c.train_samples = 8, 1, 32
    c.max_steps, c.eval_every, c.log_every, c.warmup_steps = 3, 2, 1, 1
    c.eval_mode, c.eval_test = "rank", False
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        setattr(node, last, value)
    return c


def test_dp_run_writes_epsilon_within_its_target(shared_data, tmp_path, capsys):
    workdir = tmp_path / "dp"
    with fast_compiles():
        code = glue.run(tiny(**{"dp.epsilon": 8.0}), str(workdir))
    assert code == 0, capsys.readouterr().err[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    p = summary["privacy"]
    n = summary["train_examples"]
    assert p["sampling"] == "poisson" and p["sampling_rate"] == 8 / n
    assert p["delta"] == pytest.approx(1 / n ** 1.1) and p["steps"] == 3
    assert 0 < p["epsilon"] <= 8.0 and p["target_epsilon"] == 8.0
    assert p["epsilon"] == pytest.approx(privacy.epsilon(
        p["noise_multiplier"], 8 / n, 3, p["delta"]), rel=1e-9)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "privacy/epsilon" in r}
    assert sorted(evals) == [2, 3]  # every evaluation
    for step, r in evals.items():
        assert "validation/score" in r and r["privacy/delta"] == p["delta"]
        assert r["privacy/epsilon"] == pytest.approx(privacy.epsilon(
            p["noise_multiplier"], 8 / n, step, p["delta"]), rel=1e-9)
    assert evals[2]["privacy/epsilon"] < evals[3]["privacy/epsilon"] <= 8.0
    train = [r for r in records if "train/examples" in r]
    assert len(train) == 3 and all(0 <= r["train/clipped_fraction"] <= 1 for r in train)


@pytest.mark.parametrize("overrides, message", [
    ({"dp.epsilon": 3.0, "dp.noise_multiplier": 1.0},
     r"--config.dp.noise_multiplier=1.0 and --config.dp.epsilon=3.0: set one"),
    ({"dp.noise_multiplier": 0.0}, r"--config.dp.noise_multiplier=0.0: must be > 0"),
    ({"dp.epsilon": 3.0, "dp.clip_norm": 0.0}, r"--config.dp.clip_norm=0.0: must be a positive"),
    ({"dp.epsilon": 3.0, "dp.delta": 1.0}, r"--config.dp.delta=1.0: must be in \(0, 1\)"),
    ({"dp.epsilon": 3.0, "dp.accountant": "moments"}, r"--config.dp.accountant='moments'"),
    ({"dp.epsilon": 3.0, "packing": True}, r"--config.packing=True with --config.dp"),
])
def test_bad_dp_values_exit_2(overrides, message, shared_data, tmp_path, capsys):
    code = glue.run(tiny(**overrides), str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert re.search(message, errors[0]), errors[0]


def test_delta_must_be_below_one_over_n():
    config = tiny(**{"dp.epsilon": 3.0, "dp.delta": 0.1})
    with pytest.raises(ValueError, match=r"--config\.dp\.delta=0\.1: must be below 1 / 32"):
        dp_run.make_plan(config, num_examples=32, total_steps=3, multiple_of=1)
    plan = dp_run.make_plan(tiny(**{"dp.noise_multiplier": 1.3}), 32, 3, multiple_of=4)
    assert plan.noise_multiplier == 1.3 and plan.delta == pytest.approx(32 ** -1.1)
    assert plan.rows % 4 == 0 and plan.rows >= 8 and plan.sampling_rate == 0.25
    chunked = dp_run.make_plan(tiny(**{"dp.noise_multiplier": 1.3, "dp.microbatch_size": 3}),
                               32, 3, multiple_of=4)  # each device's rows split in chunks of 3
    assert chunked.rows % 12 == 0 and chunked.microbatch_size == 3


def test_a_dp_run_never_resumes_with_another_mechanism():
    from experiments import workdir as workdir_lib
    stored = tiny(**{"dp.epsilon": 3.0}).to_dict()
    for field, value in (("max_steps", 6), ("batch_size", 4), ("seed", 1)):
        changes = workdir_lib.config_changes(stored, tiny(**{"dp.epsilon": 3.0,
                                                             field: value}).to_dict())
        with pytest.raises(ValueError, match=f"cannot resume with changed {field}"):
            dp_run.refuse_changed_mechanism(changes)
    dp_run.refuse_changed_mechanism(workdir_lib.config_changes(  # evaluation: free to change
        stored, tiny(**{"dp.epsilon": 3.0, "eval_every": 5}).to_dict()))
    for new in (tiny(**{"dp.epsilon": 8.0}), tiny()):  # another target, or DP turned off
        changes = workdir_lib.config_changes(stored, new.to_dict())
        with pytest.raises(workdir_lib.WorkdirError, match="dp.epsilon"):
            workdir_lib.refuse_or_allow(changes, True, "checkpoint step 2")


class Interrupt(Exception):
    pass


@pytest.mark.long  # two DP runs of 6 steps; the fast version is the 3-step run above
def test_interrupted_dp_run_resumes_to_the_same_result(shared_data, tmp_path, monkeypatch):
    """Poisson samples, dropout and noise derive from (seed, step): a resumed run is the
    uninterrupted one, bit for bit, and reports the same epsilon."""
    from compacter_jax import peft
    from experiments import finetune
    config = tiny(**{"dp.noise_multiplier": 1.0, "max_steps": 6, "save_every": 2})
    with fast_compiles():
        straight = finetune.train_and_evaluate(config, tmp_path / "straight")
        real = dp_run.train_batches

        def crashing(*args, **kwargs):
            for i, item in enumerate(real(*args, **kwargs)):
                if i == 4:  # dies during step 5: the last checkpoint is step 4
                    raise Interrupt
                yield item

        monkeypatch.setattr(dp_run, "train_batches", crashing)
        with pytest.raises(Interrupt):
            finetune.train_and_evaluate(config, tmp_path / "resumed")
        monkeypatch.setattr(dp_run, "train_batches", real)
        resumed = finetune.train_and_evaluate(config, tmp_path / "resumed")
    assert resumed["privacy"] == straight["privacy"]
    a, _ = peft.load_trainable(tmp_path / "straight" / "adapter")
    b, _ = peft.load_trainable(tmp_path / "resumed" / "adapter")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def _train_records(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "train/loss" in r]


@pytest.mark.parametrize("dp", [False, True])
def test_source_bucket_gives_the_padded_runs_losses_on_fewer_columns(dp, shared_data,
                                                                    tmp_path, capsys,
                                                                    monkeypatch):
    """`--config.source_bucket=8` on padded batches (packing off; DP's Poisson batches): the
    same per-step losses (and DP's clipped fractions: the same per-example gradients) as
    the full-width batches, to float32 rounding, while the batches carry less padding.
    Dropout off: its masks are drawn per position, so they depend on the width."""
    from compacter_jax.models import config as model_config

    tiny_t5 = model_config.PRESETS["t5-tiny"]
    monkeypatch.setitem(model_config.PRESETS, "t5-tiny", tiny_t5.replace(dropout_rate=0.0))
    overrides = {"task": "sst2", "max_source_length": 64, "packing": False,
                 **({"dp.epsilon": 8.0} if dp else {})}
    runs = {}
    with fast_compiles():
        for bucket in (0, 8):
            workdir = tmp_path / f"bucket{bucket}"
            code = glue.run(tiny(source_bucket=bucket, **overrides), str(workdir))
            assert code == 0, capsys.readouterr().err[-3000:]
            runs[bucket] = _train_records(workdir)
    full, cut = runs[0], runs[8]
    assert [r["step"] for r in full] == [r["step"] for r in cut] == [1, 2, 3]
    np.testing.assert_allclose([r["train/loss"] for r in cut], [r["train/loss"] for r in full],
                               rtol=1e-5)
    if dp:
        assert [r["train/clipped_fraction"] for r in cut] == \
            [r["train/clipped_fraction"] for r in full]
    # SST-2 sentences are shorter than 64 tokens: the cut batches are less padding.
    assert all(c["train/source_fill"] > f["train/source_fill"] for c, f in zip(cut, full))


@pytest.mark.parametrize("overrides, message", [
    ({"source_bucket": -8}, r"--config.source_bucket=-8: must be 0 \(pad sources"),
    ({"source_bucket": 8}, r"--config.source_bucket=8 cuts padded batches, but compacter\+\+ "
                           r"trains on packed rows"),
])
def test_bad_source_bucket_exits_2(overrides, message, shared_data, tmp_path, capsys):
    code = glue.run(tiny(**overrides), str(tmp_path / "run"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert re.search(message, errors[0]), errors[0]
