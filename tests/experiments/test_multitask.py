"""experiments.multitask on the real RTE, MRPC and CoLA files with a tiny T5 (dropout off):
the jointly trained adapters equal separate experiments.glue runs, everything is written per
task, and an interrupted run resumes to the uninterrupted result.

The default suite runs a short two-task version (`test_quick_*`: 4 steps, 32-token sources,
one glue run to compare with); the three-task, 6-step version is `@pytest.mark.long`
(COMPACTER_LONG_TESTS=1: about 4 minutes on 2 busy cores)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tiny_runs

from compacter_jax import peft
from compacter_jax.models import from_pretrained, save_pretrained
from experiments import finetune, multitask, reporting
from experiments.configs import glue as glue_config
from experiments.configs import multitask as multitask_config

TASKS = ("rte", "mrpc", "cola")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Runs of one shape share compiled programs (jax's persistent cache, for this module), and
    XLA skips its slow optimisation passes (compile time dominates these tiny runs)."""
    with tiny_runs.fast_compiles():
        yield


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A random t5-tiny saved without dropout (the runs must not draw masks to be equal)."""
    model, params = from_pretrained("random:t5-tiny")
    return str(save_pretrained(tmp_path_factory.mktemp("backbone"),
                               model.config.replace(dropout_rate=0.0), params))


def configure(c, backbone, **overrides):
    c.model = backbone
    c.fallback_model = ""
    c.peft.reduction_factor = 8  # t5-tiny: d_model 64 -> bottleneck 8, divisible by n = 4
    c.max_source_length = 64
    c.train_samples = 40         # 5 steps per epoch of 8
    c.batch_size = 8
    c.eval_batch_size = 16
    c.max_eval_samples = 16
    c.learning_rate = 1e-2
    c.warmup_steps = 2
    c.max_steps = 6
    c.eval_every = 3
    c.save_every = 3
    c.log_every = 3              # aligned with save_every: a resumed window is a whole one
    c.num_devices = 1
    c.eval_mode = "generate"
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def joint_config(backbone, **overrides):
    return configure(multitask_config.get_config(), backbone,
                     **{"tasks": ",".join(TASKS), **overrides})


def read_events(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def joint_run(shared_data, compile_cache, backbone, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("joint")
    return workdir, multitask.train_and_evaluate(joint_config(backbone), workdir)


@pytest.mark.long
def test_joint_adapters_equal_separate_glue_runs(joint_run, backbone, tmp_path):
    workdir, summary = joint_run
    assert summary["packed"]  # compacter++ packs by default: the joint rows are single-task
    for task in TASKS:
        single = finetune.train_and_evaluate(
            configure(glue_config.get_config(), backbone, task=task), tmp_path / task)
        assert single["best_step"] == summary["tasks"][task]["best_step"]
        assert single["validation"]["validation/score"] == pytest.approx(
            summary["tasks"][task]["validation"]["score"])
        assert single["test"] == pytest.approx(summary["tasks"][task]["test"])
        got, meta = peft.load_trainable(workdir / "adapters" / task)
        want, _ = peft.load_trainable(tmp_path / task / "adapter")
        assert meta["task"] == task and meta["step"] == single["best_step"]
        flat_got = jax.tree_util.tree_leaves_with_path(got)
        flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
        assert len(flat_got) == len(flat_want)
        for path, value in flat_got:
            np.testing.assert_allclose(value, flat_want[path], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{task}: {jax.tree_util.keystr(path)}")


@pytest.mark.long
def test_everything_is_written_per_task(joint_run):
    workdir, summary = joint_run
    events = read_events(workdir)
    for task in TASKS:
        evals = [e for e in events if f"{task}/validation/score" in e]
        assert [e["step"] for e in evals] == [3, 6]
        assert any(f"{task}/test/score" in e for e in events)
        assert [e["step"] for e in events if f"{task}/train/loss" in e] == [3, 6]
        for split in ("validation", "test"):
            rows = (workdir / "predictions" / task / f"{split}.jsonl").read_text().splitlines()
            assert len(rows) == 16 and {"prediction", "parsed"} <= set(json.loads(rows[0]))
        model, params = peft.load_adapter(workdir / "adapters" / task)
        assert model.config.dropout_rate == 0.0 and "peft_root" in params
        assert (workdir / f"learning_curves_{task}.png").stat().st_size > 1000
        assert (workdir / "checkpoints" / task / "best").is_dir()
    assert [e["step"] for e in events if "train/loss" in e] == [3, 6]
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 6
    assert sorted(summary["tasks"]) == sorted(TASKS)


class Interrupt(Exception):
    pass


@pytest.mark.long
def test_interrupted_run_resumes_to_the_same_result(joint_run, backbone, tmp_path,
                                                    monkeypatch):
    straight_dir, straight = joint_run
    real_batches = multitask.data_lib.pipeline.train_batches

    def crashing_batches(*args, **kwargs):
        for i, item in enumerate(real_batches(*args, **kwargs)):
            if i == 4 and "state" in kwargs:  # dies during step 5: the last checkpoint is 3
                raise Interrupt
            yield item

    monkeypatch.setattr(multitask.data_lib.pipeline, "train_batches", crashing_batches)
    with pytest.raises(Interrupt):
        multitask.train_and_evaluate(joint_config(backbone), tmp_path)
    assert (tmp_path / "checkpoints" / "steps" / "3").is_dir()
    monkeypatch.setattr(multitask.data_lib.pipeline, "train_batches", real_batches)
    resumed = multitask.train_and_evaluate(joint_config(backbone), tmp_path)
    for task in TASKS:
        assert resumed["tasks"][task]["test"] == straight["tasks"][task]["test"]
        a, _ = peft.load_trainable(straight_dir / "adapters" / task)
        b, _ = peft.load_trainable(tmp_path / "adapters" / task)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(x, y)
    loss = lambda d: {e["step"]: e["rte/train/loss"] for e in read_events(d)  # noqa: E731
                      if "rte/train/loss" in e}
    assert loss(tmp_path) == loss(straight_dir)


def test_bad_task_lists_are_refused(backbone, tmp_path):
    with pytest.raises(ValueError, match="unknown task 'rtee'"):
        multitask.train_and_evaluate(joint_config(backbone, tasks="rte,rtee"), tmp_path)
    with pytest.raises(ValueError, match=r"\['rte'\] more than once"):
        multitask.train_and_evaluate(joint_config(backbone, tasks="rte,mrpc,rte"), tmp_path)
    full = joint_config(backbone, method="full")
    full.peft.reduction_factor = None
    with pytest.raises(ValueError, match="'full' .* cannot be banked"):
        multitask.train_and_evaluate(full, tmp_path)


def test_a_workdir_in_use_or_a_bad_field_is_refused_before_loading(backbone, tmp_path):
    from experiments.spec import ConfigError
    from experiments.workdir import WorkdirError, WorkdirLock

    with pytest.raises(ConfigError, match="batch_size"):
        multitask.train_and_evaluate(joint_config(backbone, batch_size=0), tmp_path / "bad")
    (tmp_path / "busy").mkdir()
    lock = WorkdirLock(tmp_path / "busy")
    lock.acquire()
    try:
        with pytest.raises(WorkdirError, match="in use"):
            multitask.train_and_evaluate(joint_config(backbone), tmp_path / "busy")
    finally:
        lock.release()


# ------------------------------------------------------- quick version (default suite)

QUICK_TASKS = ("rte", "mrpc")


# 4 steps of 8 (2 per epoch), evaluation and checkpoints every 2 steps, 32-token sources and
# 8 evaluation examples: one length bucket, few compiled programs.
QUICK = {"max_source_length": 32, "train_samples": 16, "max_steps": 4, "eval_every": 2,
         "save_every": 2, "log_every": 2, "eval_batch_size": 8, "max_eval_samples": 8}


def quick_config(backbone):
    return configure(multitask_config.get_config(), backbone,
                     **{"tasks": ",".join(QUICK_TASKS), **QUICK})


def _crash_during(step):
    """A `data.pipeline.train_batches` that dies while drawing the batch of `step` (of a joint
    run's streams, which are drawn with an explicit `state`)."""
    real = multitask.data_lib.pipeline.train_batches

    def crashing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == step - 1 and "state" in kwargs:
                raise Interrupt
            yield item

    return crashing


def _assert_same_adapters(dir_a, dir_b, tol=None):
    a, _ = peft.load_trainable(dir_a)
    b = dict(jax.tree_util.tree_leaves_with_path(peft.load_trainable(dir_b)[0]))
    flat = jax.tree_util.tree_leaves_with_path(a)
    assert len(flat) == len(b)
    for path, value in flat:
        if tol is None:
            np.testing.assert_array_equal(value, b[path], err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(value, b[path], rtol=tol, atol=tol,
                                       err_msg=jax.tree_util.keystr(path))


def test_quick_joint_run_resumes_to_the_glue_run(shared_data, backbone, tmp_path,
                                                 monkeypatch):
    """Interrupted while drawing step 3 (the last checkpoint is step 2) and resumed, the joint
    run's second adapter equals an uninterrupted experiments.glue run of that task (<= 1e-5):
    a wrong data position, slice, schedule or packing after the resume would show. (The
    exact equality of a resumed and an uninterrupted joint step is
    tests/train/test_train_multitask.py's; three tasks against three glue runs is `long` above.)"""
    workdir = tmp_path / "joint"
    monkeypatch.setattr(multitask.data_lib.pipeline, "train_batches", _crash_during(3))
    with pytest.raises(Interrupt):
        multitask.train_and_evaluate(quick_config(backbone), workdir)
    assert (workdir / "checkpoints" / "steps" / "2").is_dir()
    assert not (workdir / "adapters").exists()
    monkeypatch.undo()
    writes = []  # issue 19: the metrics cut back and the summary, each written atomically
    atomic_write = reporting.atomic_write
    monkeypatch.setattr(reporting, "atomic_write",
                        lambda path, text: writes.append(path.name) or atomic_write(path, text))
    joint = multitask.train_and_evaluate(quick_config(backbone), workdir)
    monkeypatch.undo()
    # (the learning-curve plots go through the same writer)
    assert [w for w in writes if not w.endswith(".png")] == ["metrics.jsonl", "summary.json"]
    assert json.loads((workdir / "summary.json").read_text())["tasks"].keys() == set(
        QUICK_TASKS)
    single = finetune.train_and_evaluate(
        configure(glue_config.get_config(), backbone, task="mrpc", **QUICK), tmp_path / "mrpc")
    assert joint["packed"] and single["best_step"] == joint["tasks"]["mrpc"]["best_step"]
    assert single["test"] == pytest.approx(joint["tasks"]["mrpc"]["test"])
    _assert_same_adapters(workdir / "adapters" / "mrpc", tmp_path / "mrpc" / "adapter",
                          tol=1e-5)
    # Everything is written per task.
    events = read_events(workdir)
    for task in QUICK_TASKS:
        assert [e["step"] for e in events if f"{task}/validation/score" in e] == [2, 4]
        assert [e["step"] for e in events if f"{task}/train/loss" in e] == [2, 4]
        assert any(f"{task}/test/score" in e for e in events)
        for split in ("validation", "test"):
            rows = (workdir / "predictions" / task / f"{split}.jsonl").read_text().splitlines()
            assert len(rows) == 8 and {"prediction", "parsed"} <= set(json.loads(rows[0]))
        model, params = peft.load_adapter(workdir / "adapters" / task)
        assert model.config.dropout_rate == 0.0 and "peft_root" in params
        assert (workdir / "checkpoints" / task / "best").is_dir()
    assert [e["step"] for e in events if "train/loss" in e] == [2, 4]
    assert sorted(joint["tasks"]) == sorted(QUICK_TASKS)


# ----------------------------------------------------------------- joint batches (no model)


def _encoded(task, n, target_width, seed):
    from compacter_jax import data as data_lib

    rs = np.random.RandomState(seed)
    src = rs.randint(1, 9, n)
    tgt = rs.randint(1, target_width + 1, n)
    mask = (np.arange(8)[None] < src[:, None]).astype(np.int32)
    dmask = (np.arange(target_width)[None] < tgt[:, None]).astype(np.int32)
    return data_lib.EncodedData(data_lib.get_task(task),
                                rs.randint(2, 50, (n, 8)).astype(np.int32) * mask, mask,
                                rs.randint(2, 50, (n, target_width)).astype(np.int32) * dmask,
                                dmask, (0,) * n, (None,) * n, 0, 0)


def _runs(total_steps=(2, 4)):
    config = multitask_config.get_config()
    config.batch_size, config.seed = 4, 3
    specs = [("rte", 10, 3), ("cola", 6, 4)]  # 3 and 2 steps per epoch; target widths differ
    return config, [multitask.TaskRun(k, name, None, {"train": _encoded(name, n, w, k)},
                                      -(-n // 4), total, 0, w)
                    for k, ((name, n, w), total) in enumerate(zip(specs, total_steps))]


def test_joint_batches_hold_each_tasks_single_run_batches():
    from compacter_jax import data as data_lib

    config, runs = _runs()
    start = {r.name: data_lib.DataState() for r in runs}
    stream = multitask.train_batches(config, runs, start, 0, plan=None)
    single = [list(data_lib.train_batches(r.encoded["train"], 4, seed=3, num_epochs=3))
              for r in runs]
    for step in range(1, 5):
        positions, batch = next(stream)
        assert batch["input_ids"].shape == (8, 8) and batch["labels"].shape == (8, 4)
        np.testing.assert_array_equal(batch["task_ids"], [0] * 4 + [1] * 4)
        for k, run in enumerate(runs):
            rows = slice(4 * k, 4 * k + 4)
            if step > run.total_steps:  # finished: empty rows, position kept
                assert batch["attention_mask"][rows].sum() == 0
                assert positions[run.name] == single[k][run.total_steps - 1][1]
                continue
            want, after = single[k][step - 1]
            want = data_lib.pad_batch(want, 4)
            n = want["labels"].shape[1]
            for key in ("input_ids", "attention_mask"):
                np.testing.assert_array_equal(batch[key][rows], want[key])
            for key in ("labels", "decoder_input_ids", "decoder_attention_mask"):
                np.testing.assert_array_equal(batch[key][rows, :n], want[key])
                assert not batch[key][rows, n:].any()  # widened with masked zeros
            assert positions[run.name] == after


def test_packed_joint_batches_keep_one_task_per_row():
    from compacter_jax import data as data_lib

    config, runs = _runs(total_steps=(3, 2))
    plan = data_lib.PackingPlan(16, 8, (2, 4, 8))
    stream = multitask.train_batches(config, runs, {r.name: data_lib.DataState() for r in runs},
                                     0, plan)
    single = [list(data_lib.train_batches(r.encoded["train"], 4, seed=3, num_epochs=2))
              for r in runs]
    for step in range(1, 4):
        _, packed = next(stream)
        examples = data_lib.unpack_batch(packed)
        row_task = np.repeat(packed["task_ids"], [int(s.max(initial=0)) for s in
                                                  packed["encoder_segment_ids"]])
        for k, run in enumerate(runs):
            mine = [ex for ex, t in zip(examples, row_task) if t == k]
            if step > run.total_steps:
                assert not mine
                continue
            want, _ = single[k][step - 1]
            got_sources = sorted(tuple(src) for src, _ in mine)
            want_sources = sorted(tuple(r[m == 1]) for r, m in
                                  zip(want["input_ids"], want["attention_mask"]))
            assert got_sources == want_sources


# ------------------------------------------------- multi-task ATTEMPT (attention shared)


def _source_prompts(tmp_path, backbone, d_model):
    """Two prompt-tuning exports (random 4-token prompts): ATTEMPT's sources."""
    from compacter_jax.peft import get_method, save_adapter

    return tuple(str(save_adapter(tmp_path / f"src{k}", {"encoder": {"prompt": {
        "embedding": np.random.default_rng(k).normal(size=(4, d_model)).astype(np.float32)}}},
        get_method("prompt_tuning", length=4), model=backbone)) for k in range(2))


def test_attempt_trains_jointly_with_one_attention(shared_data, backbone, tmp_path):
    """`--config.method=attempt` on RTE and MRPC, 2 steps: the bank holds a target prompt per
    task and one attention module; each task's export loads as a
    single-task ATTEMPT adapter holding that same (shared) attention and its own prompt."""
    from compacter_jax.peft import load_adapter, load_trainable

    d_model = from_pretrained(backbone)[0].config.d_model
    sources = _source_prompts(tmp_path, backbone, d_model)
    c = configure(multitask_config.get_config(), backbone, tasks="rte,mrpc", method="attempt",
                  **{**QUICK, "max_steps": 2, "eval_every": 0, "save_every": 2, "log_every": 1,
                     "eval_test": False})
    c.peft.reduction_factor = None
    c.peft.sources, c.peft.length, c.peft.attn_dim = sources, 4, 8
    summary = multitask.train_and_evaluate(c, tmp_path / "joint")
    assert not summary["packed"] and summary["steps"] == 2
    # Per task as single-task ATTEMPT counts it: a 4 x d prompt + the attention (d x 8 x 2 + 2d).
    assert summary["trainable_params_per_task"] == 4 * d_model + 2 * d_model * 8 + 2 * d_model
    losses = [e["train/loss"] for e in read_events(tmp_path / "joint") if "train/loss" in e]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    exports = {t: load_trainable(tmp_path / "joint" / "adapters" / t)[0]["encoder"]["prompt"]
               for t in ("rte", "mrpc")}
    for leaf in ("down", "up", "norm"):       # one attention, trained, copied into both
        jax.tree_util.tree_map(np.testing.assert_array_equal, exports["rte"][leaf],
                               exports["mrpc"][leaf])
    # Both prompts start as source 0 (init="source"): they differ after training, per task.
    assert not np.array_equal(exports["rte"]["embedding"], exports["mrpc"]["embedding"])
    for t in ("rte", "mrpc"):
        model, params = load_adapter(tmp_path / "joint" / "adapters" / t)
        assert params["encoder"]["prompt"]["embedding"].shape == (4, d_model)


@pytest.mark.long
def test_attempt_resumes_to_the_uninterrupted_run(shared_data, backbone, tmp_path, monkeypatch):
    """Multi-task ATTEMPT interrupted after its step-2 checkpoint and resumed ends exactly as an
    uninterrupted run (the shared attention's optimizer state is checkpointed with the bank)."""
    from compacter_jax.peft import load_trainable

    d_model = from_pretrained(backbone)[0].config.d_model
    sources = _source_prompts(tmp_path, backbone, d_model)

    def config():
        c = configure(multitask_config.get_config(), backbone, tasks="rte,mrpc",
                      method="attempt", **{**QUICK, "max_steps": 3, "eval_every": 0,
                                           "save_every": 1, "log_every": 1, "eval_test": False})
        c.peft.reduction_factor = None
        c.peft.sources, c.peft.length, c.peft.attn_dim = sources, 4, 8
        return c

    multitask.train_and_evaluate(config(), tmp_path / "straight")
    monkeypatch.setattr(multitask.data_lib.pipeline, "train_batches", _crash_during(3))
    with pytest.raises(Interrupt):
        multitask.train_and_evaluate(config(), tmp_path / "resumed")
    monkeypatch.undo()
    multitask.train_and_evaluate(config(), tmp_path / "resumed")
    for task in ("rte", "mrpc"):
        jax.tree_util.tree_map(
            np.testing.assert_array_equal,
            load_trainable(tmp_path / "straight" / "adapters" / task)[0],
            load_trainable(tmp_path / "resumed" / "adapters" / task)[0])
