"""Loop building blocks: a loop written with them (as each experiment writes its own) resumes
an interrupted run identically, also under another strategy; NaN stops the run before any
checkpoint of it is written; `due`, `MetricsBuffer`, `mean_metrics`, `evaluate_loss`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_toy import ToyData, make_batch

from compacter_jax.peft import partition
from compacter_jax.train import (Checkpointer, MetricsBuffer, NonFiniteLossError, TrainState,
                                 due, evaluate_loss, make_eval_step, make_optimizer,
                                 make_strategy, make_train_step, mean_metrics)

NUM_STEPS = 7  # 3 batches per epoch: crosses two epoch boundaries
SAVE_EVERY, EVAL_EVERY = 2, 3


class Crash(Exception):
    pass


def crash_after(source, n):
    def batches(position):
        for i, item in enumerate(source(position)):
            if i == n:
                raise Crash(f"simulated crash before batch {i}")
            yield item
    return batches


_STEPS = {}


def steps_for(toy, strategy, apply_fn):
    """(compiled train step, compiled eval step, tx), built once per (model, strategy) so that
    jax's compilation cache is reused across the runs of a test."""
    key = (id(toy), strategy.name, apply_fn)
    if key not in _STEPS:
        tx, schedule = make_optimizer(1e-2, 2, NUM_STEPS)
        step = make_train_step(apply_fn, tx, merge_fn=partition.merge, schedule=schedule,
                               per_example_dropout=True)
        _STEPS[key] = (strategy.compile_train_step(step), strategy.compile_eval_step(
            make_eval_step(apply_fn, merge_fn=partition.merge)), tx)
    return _STEPS[key]


def run(toy, strategy, directory, batches, apply_fn=None, log_every=1, eval_every=EVAL_EVERY,
        save_every=SAVE_EVERY):
    """The loop of experiments/finetune.py on the toy: resume, step, log, evaluate, save."""
    step_fn, eval_step, tx = steps_for(toy, strategy, apply_fn or toy.apply_fn)
    eval_batch = make_batch(np.random.default_rng(99), 8)
    history, evals = [], []
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        state, position = TrainState.create(toy.trainable, tx, 42), None
        if (restored := ckpt.restore_latest(state)) is not None:
            state, meta = restored
            position = meta["data_position"]
        dev_state, dev_frozen = strategy.replicate(state), strategy.put_frozen(toy.frozen)
        source, buffer = iter(batches(position)), MetricsBuffer(strategy)
        for step in range(int(state.step) + 1, NUM_STEPS + 1):
            position, batch = next(source)
            dev_state, metrics = step_fn(dev_state, dev_frozen, strategy.shard_batch(batch))
            buffer.add(step, metrics)
            do_eval, do_save = due(step, eval_every, NUM_STEPS), due(step, save_every, NUM_STEPS)
            if due(step, log_every, NUM_STEPS) or do_eval or do_save:
                history += buffer.flush()
            if do_eval:
                r = evaluate_loss(eval_step, strategy, dev_state.params, dev_frozen, [eval_batch])
                evals.append({"step": step, "score": -r["loss"], **r})
                ckpt.save_best(step, strategy.unreplicate(dev_state.params), -r["loss"])
            if do_save:
                ckpt.save(step, strategy.unreplicate(dev_state), {"data_position": position})
        ckpt.wait()
        return dev_state, position, history, evals, ckpt.best_score, ckpt.latest_step()


def losses(history):
    return {h["step"]: h["loss"] for h in history}


def test_interrupted_run_resumes_identically(toy, tmp_path):
    jit = make_strategy("jit")
    data = ToyData()
    full_state, full_position, full, full_evals, full_best, _ = run(toy, jit, tmp_path / "full",
                                                                    data)
    assert sorted(losses(full)) == list(range(1, NUM_STEPS + 1))
    assert [e["step"] for e in full_evals] == [3, 6, 7]
    assert full_position == {"epoch": 2, "index": 1}

    with pytest.raises(Crash):
        run(toy, jit, tmp_path / "resumed", crash_after(data, 5))
    with Checkpointer(tmp_path / "resumed") as ckpt:
        assert ckpt.latest_step() == 4  # saved at 2 and 4; batch 6 never arrived
    state, position, resumed, _, best, latest = run(toy, jit, tmp_path / "resumed", data)
    assert latest == NUM_STEPS
    assert sorted(losses(resumed)) == [5, 6, 7]
    for s in (5, 6, 7):
        assert losses(resumed)[s] == losses(full)[s]  # bit-identical
    assert position == full_position
    assert best == full_best == max(e["score"] for e in full_evals)
    final_full = jit.unreplicate(full_state)
    for a, b in zip(jax.tree_util.tree_leaves(jit.unreplicate(state)),
                    jax.tree_util.tree_leaves(final_full)):
        np.testing.assert_array_equal(a, b)

    # a checkpoint written under jit resumes under pmap (same numbers up to reduction order)
    with pytest.raises(Crash):
        run(toy, jit, tmp_path / "cross", crash_after(data, 5))
    pmap = make_strategy("pmap")
    cross_state, _, cross, *_ = run(toy, pmap, tmp_path / "cross", data)
    np.testing.assert_allclose([losses(cross)[s] for s in (5, 6, 7)],
                               [losses(full)[s] for s in (5, 6, 7)], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(pmap.unreplicate(cross_state)),
                    jax.tree_util.tree_leaves(final_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # a finished run started again does nothing
    again_state, _, again, *_ = run(toy, jit, tmp_path / "full", data)
    assert again == [] and int(jit.unreplicate(again_state.step)) == NUM_STEPS


def test_nonfinite_loss_stops_before_saving(toy_no_dropout, tmp_path):
    toy = toy_no_dropout

    def nan_apply(params, batch, det, rngs):  # NaN logits for batches with a marked token
        logits = toy.apply_fn(params, batch, det, rngs)
        return jnp.where(jnp.any(batch["input_ids"] < 0), jnp.nan, logits)

    data = ToyData()

    def poisoned(position):
        for i, (after, batch) in enumerate(data(position)):
            if i == 2:  # the 3rd update
                batch = dict(batch, input_ids=batch["input_ids"].copy())
                batch["input_ids"][0, 0] = -1
            yield after, batch

    with pytest.raises(NonFiniteLossError, match="update 3"):
        run(toy, make_strategy("jit"), tmp_path, poisoned, apply_fn=nan_apply,
            save_every=3, log_every=0, eval_every=0)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None  # the step-3 save was refused


def test_due_and_mean_metrics():
    assert [s for s in range(1, 11) if due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if due(s, 0, 10)] == [10]
    assert [s for s in range(1, 5) if due(s, 0)] == []
    assert mean_metrics([{"step": 1, "loss": 1.0, "tokens": 4.0},
                         {"step": 2, "loss": 3.0, "tokens": 6.0}]) == {"loss": 2.0, "tokens": 5.0}
    assert mean_metrics([]) == {}


def test_metrics_buffer_flushes_in_order_and_refuses_nan():
    buffer = MetricsBuffer(make_strategy("jit"))
    buffer.add(1, {"loss": jnp.float32(2.0), "grad_norm": jnp.float32(1.0),
                   "finite": jnp.float32(1.0)})
    buffer.add(2, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0),
                   "finite": jnp.float32(1.0)})
    assert len(buffer) == 2
    assert [r["step"] for r in buffer.flush()] == [1, 2] and len(buffer) == 0
    buffer.add(3, {"loss": jnp.float32(np.nan), "grad_norm": jnp.float32(1.0),
                   "finite": jnp.float32(0.0)})
    with pytest.raises(NonFiniteLossError, match="update 3"):
        buffer.flush()
