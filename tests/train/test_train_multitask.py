"""The joint multi-task step (toy model): K tasks trained together equal K separate runs (own
optimizer state, schedule length, loss normalisation and clipping per task; a finished task
is left alone), a resume mid-way equals the uninterrupted run, and jit over a mesh / pmap
give the single-device numbers."""

import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest
from train_toy import ToyData

from compacter_jax.peft import bank as bank_lib
from compacter_jax.peft import partition
from compacter_jax.peft.method import Method
from compacter_jax.train import Checkpointer, make_optimizer, make_strategy, make_train_step
from compacter_jax.train.multitask import (init_multitask_state, make_multitask_train_step,
                                           slice_tree)
from compacter_jax.train.state import TrainState

TOTALS = (3, 5, 4)           # task 0 finishes first, task 1 last
LEARNING_RATES = (3e-2, 1e-2, 5e-2)
BATCH = 8
STEPS = max(TOTALS)


def _optimizers():
    # Clipping at 0.5 is active on the toy's gradients: per-task clipping matters.
    return [make_optimizer(lr, 2, total, clip_norm=0.5) for lr, total in
            zip(LEARNING_RATES, TOTALS)]


def _start(toy):
    """Three distinct initial adapters (the toy's trainable tree plus noise)."""
    out = []
    for k in range(len(TOTALS)):
        rs = np.random.RandomState(k)
        out.append(jax.tree_util.tree_map(
            lambda x: x + 0.1 * rs.randn(*x.shape).astype(x.dtype), toy.trainable))
    return out


def _data():
    return [ToyData(num_examples=24, batch_size=BATCH, seed=10 + k)() for k in range(len(TOTALS))]


def _joint_batch(step, streams):
    """Every task's next batch, concatenated with task_ids; a finished task sends empty rows."""
    parts, ids = [], []
    for k, stream in enumerate(streams):
        _, batch = next(stream)
        if step > TOTALS[k]:
            batch = {key: np.zeros_like(v) for key, v in batch.items()}
        parts.append(batch)
        ids.append(np.full(BATCH, k, np.int32))
    joint = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return {**joint, "task_ids": np.concatenate(ids)}


def _separate(toy, k):
    tx, schedule = _optimizers()[k]
    step = jax.jit(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge,
                                   schedule=schedule))
    state = TrainState.create(_start(toy)[k], tx, 0)
    losses = []
    stream = _data()[k]
    for _ in range(TOTALS[k]):
        state, metrics = step(state, toy.frozen, next(stream)[1])
        losses.append(float(metrics["loss"]))
    return state, losses


def _joint_step(toy):
    opts = _optimizers()
    bank_apply = bank_lib.make_bank_apply(toy.apply_fn, Method(name="toy"))
    step = make_multitask_train_step(bank_apply, [tx for tx, _ in opts], total_steps=TOTALS,
                                     names=["a", "b", "c"], schedules=[s for _, s in opts])
    state = init_multitask_state(bank_lib.stack_adapters(_start(toy)), [tx for tx, _ in opts], 0)
    return step, state


def _run_joint(toy, step_fn, state, frozen, first, last, streams, strategy=None):
    history = []
    for step in range(first, last + 1):
        batch = _joint_batch(step, streams)
        if strategy is not None:
            batch = strategy.shard_batch(batch)
        state, metrics = step_fn(state, frozen, batch)
        if strategy is not None:
            metrics = strategy.unreplicate(metrics)
        history.append({k: float(np.asarray(v)) for k, v in metrics.items()})
    return state, history


def _assert_trees_close(got, want, tol=1e-5):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def separate_runs():
    from train_toy import make_toy

    toy = make_toy(dropout=0.0)
    return toy, [_separate(toy, k) for k in range(len(TOTALS))]


@pytest.fixture(scope="module")
def joint(separate_runs):
    """(jitted joint step, fresh state): compiled once for the module's tests."""
    step_fn, state = _joint_step(separate_runs[0])
    return jax.jit(step_fn), state


def test_joint_training_equals_separate_runs(separate_runs, joint):
    toy, separate = separate_runs
    step_fn, state = joint
    state, history = _run_joint(toy, step_fn, state, toy.frozen, 1, STEPS, _data())
    assert int(state.step) == STEPS
    for k, (name, (single, losses)) in enumerate(zip("abc", separate)):
        _assert_trees_close(slice_tree(state.params, k), single.params)
        _assert_trees_close(state.opt_state[k], single.opt_state)  # Adam moments and count
        np.testing.assert_allclose([h[f"{name}/loss"] for h in history[:TOTALS[k]]], losses,
                                   rtol=1e-5)
        assert [h[f"{name}/active"] for h in history] == [1.0] * TOTALS[k] + [0.0] * (
            STEPS - TOTALS[k])
    # The joint loss is the sum of the active tasks' token means.
    np.testing.assert_allclose(history[0]["loss"], sum(s[1][0] for s in separate), rtol=1e-5)
    np.testing.assert_allclose(history[4]["loss"], separate[1][1][4], rtol=1e-5)
    assert all(h["finite"] == 1.0 for h in history)
    assert history[0]["a/learning_rate"] == 0.0 and history[1]["a/learning_rate"] > 0
    # The tasks really moved, and differently (a mixed-up slice would not pass above).
    moved = [np.abs(np.asarray(jax.tree_util.tree_leaves(slice_tree(state.params, k))[0])
                    - np.asarray(jax.tree_util.tree_leaves(_start(toy)[k])[0])).max()
             for k in range(3)]
    assert min(moved) > 1e-3


def test_finished_task_is_not_updated(separate_runs, joint):
    """Feeding a finished task real examples changes nothing: its slice and Adam state stay."""
    toy, separate = separate_runs
    step_fn, state = joint
    streams = _data()
    state, _ = _run_joint(toy, step_fn, state, toy.frozen, 1, TOTALS[0], streams)
    frozen_slice = slice_tree(state.params, 0)
    for step in range(TOTALS[0] + 1, TOTALS[0] + 3):
        batch = _joint_batch(1, streams)  # step 1: nobody is "finished" in the batch
        state, metrics = step_fn(state, toy.frozen, batch)
        assert float(metrics["a/active"]) == 0.0
    for got, want in zip(jax.tree_util.tree_leaves(slice_tree(state.params, 0)),
                         jax.tree_util.tree_leaves(frozen_slice)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _assert_trees_close(slice_tree(state.params, 0), separate[0][0].params)


def test_resume_mid_way_equals_the_uninterrupted_run(separate_runs, joint, tmp_path):
    toy, _ = separate_runs
    step_fn, fresh = joint
    whole, _ = _run_joint(toy, step_fn, fresh, toy.frozen, 1, STEPS, _data())

    streams = _data()
    half, _ = _run_joint(toy, step_fn, fresh, toy.frozen, 1, 2, streams)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, jax.device_get(half), {"data": "opaque"})
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore_latest(fresh)
    assert int(restored.step) == 2 and meta == {"data": "opaque"}
    resumed, _ = _run_joint(toy, step_fn, restored, toy.frozen, 3, STEPS, streams)
    for got, want in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(whole)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("kind", ["jit", pytest.param("pmap", marks=pytest.mark.long)])
def test_data_parallel_strategies_give_the_single_device_numbers(separate_runs, kind):
    toy, separate = separate_runs
    step_fn, state = _joint_step(toy)
    strategy = make_strategy(kind)
    assert strategy.num_devices == 4
    compiled = strategy.compile_train_step(step_fn)
    state, history = _run_joint(toy, compiled, strategy.replicate(state),
                                strategy.put_frozen(toy.frozen), 1, STEPS, _data(), strategy)
    host = strategy.unreplicate(state)
    for k, (single, losses) in enumerate(separate):
        _assert_trees_close(slice_tree(host.params, k), single.params)
    np.testing.assert_allclose([h["b/loss"] for h in history], separate[1][1], rtol=1e-5)


def test_pmap_with_dropout_draws_the_masks_of_one_device():
    """Before: pmap folded the device index into the dropout key, so each device drew other
    masks than one device does for the same rows (other losses). Now keys follow the global
    row: the losses of 3 dropout-on steps agree to float32 precision."""
    from train_toy import make_toy
    toy = make_toy(dropout=0.3)
    step_fn, state = _joint_step(toy)
    _, single = _run_joint(toy, jax.jit(step_fn), state, toy.frozen, 1, 3, _data())
    strategy = make_strategy("pmap")
    _, sharded = _run_joint(toy, strategy.compile_train_step(step_fn), strategy.replicate(state),
                            strategy.put_frozen(toy.frozen), 1, 3, _data(), strategy)
    for one, many in zip(single, sharded):
        for key in ("a/loss", "b/loss", "c/loss"):
            np.testing.assert_allclose(many[key], one[key], rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_refused(separate_runs):
    toy, _ = separate_runs
    opts = [tx for tx, _ in _optimizers()]
    apply = bank_lib.make_bank_apply(toy.apply_fn, Method(name="toy"))
    with pytest.raises(ValueError, match="2 total_steps for 3 optimizers"):
        make_multitask_train_step(apply, opts, total_steps=(1, 2))
    with pytest.raises(ValueError, match=">= 1"):
        make_multitask_train_step(apply, opts, total_steps=(1, 0, 2))
    with pytest.raises(ValueError, match="distinct"):
        make_multitask_train_step(apply, opts, total_steps=TOTALS, names=["a", "a", "b"])
    with pytest.raises(ValueError, match="one per task"):
        init_multitask_state(bank_lib.stack_adapters(_start(toy)), opts[:2], 0)


def test_a_shared_leaf_trains_the_same_on_four_devices(separate_runs):
    """A bank whose `lm_head` is one for all tasks (no task axis, its own optimizer) takes the
    same 2 steps on the data-parallel strategy (4 devices) as on one device."""
    toy, _ = separate_runs
    opts = _optimizers()
    shared = frozenset(p for p in traverse_util.flatten_dict(toy.trainable) if p[0] == "lm_head")
    shared_tx = make_optimizer(1e-2, 2, STEPS, clip_norm=0.5)[0]
    step_fn = make_multitask_train_step(
        bank_lib.make_bank_apply(toy.apply_fn, Method(name="toy"), shared),
        [tx for tx, _ in opts], total_steps=TOTALS, names=["a", "b", "c"], shared=shared,
        shared_tx=shared_tx)
    start = _start(toy)
    start = [{**t, "lm_head": start[0]["lm_head"]} for t in start]
    state = init_multitask_state(bank_lib.stack_adapters(start, shared),
                                 [tx for tx, _ in opts], 0, shared=shared, shared_tx=shared_tx)
    assert state.params["lm_head"]["kernel"].shape == toy.trainable["lm_head"]["kernel"].shape
    one, history = _run_joint(toy, jax.jit(step_fn), state, toy.frozen, 1, 2, _data())
    strategy = make_strategy("jit")
    many, _ = _run_joint(toy, strategy.compile_train_step(step_fn), strategy.replicate(state),
                         strategy.put_frozen(toy.frozen), 1, 2, _data(), strategy)
    assert history[-1]["shared/grad_norm"] > 0
    assert not np.allclose(one.params["lm_head"]["kernel"], state.params["lm_head"]["kernel"])
    _assert_trees_close(strategy.unreplicate(many).params, one.params)
