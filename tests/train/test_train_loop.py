"""Host loop: an interrupted-then-resumed run reproduces the uninterrupted one; NaN stops the
run before any checkpoint of it is written; evaluation feeds the best record."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_toy import ToyData, make_batch

from compacter_jax.train.checkpoint import Checkpointer
from compacter_jax.data.pipeline import DataState
from compacter_jax.train.loop import evaluate_loss, train_loop
from compacter_jax.train.optim import make_optimizer
from compacter_jax.train.parallel import make_strategy
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import NonFiniteLossError, make_eval_step, make_train_step

NUM_STEPS = 7  # 3 batches per epoch: crosses two epoch boundaries


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
    """(train_step, eval_step, tx), built once per (model, strategy) so that jax's compilation
    cache is reused across the runs of a test."""
    key = (id(toy), strategy.name, apply_fn)
    if key not in _STEPS:
        tx, schedule = make_optimizer(1e-2, 2, NUM_STEPS)
        _STEPS[key] = (make_train_step(apply_fn, tx, schedule=schedule),
                       strategy.compile_eval_step(make_eval_step(apply_fn)), tx)
    return _STEPS[key]


def run(toy, strategy, directory, batches, apply_fn=None, **kw):
    train_step, ev, tx = steps_for(toy, strategy, apply_fn or toy.apply_fn)
    eval_batch = make_batch(np.random.default_rng(99), 8)

    def eval_fn(state, frozen, step):
        r = evaluate_loss(ev, strategy, state.params, frozen, [eval_batch])
        return {"score": -r["loss"], **r}

    with Checkpointer(directory, max_to_keep=2) as ckpt:
        result = train_loop(
            state=TrainState.create(toy.trainable, tx, 42), frozen=toy.frozen,
            train_step=train_step, strategy=strategy, batches=batches, num_steps=NUM_STEPS,
            checkpointer=ckpt, eval_fn=eval_fn,
            **{"save_every": 2, "eval_every": 3, "log_every": 1, **kw})
        return result, ckpt.latest_step()


def losses(result):
    return {h["step"]: h["loss"] for h in result.history}


def test_interrupted_run_resumes_identically(toy, tmp_path):
    jit = make_strategy("jit")
    data = ToyData()
    full, _ = run(toy, jit, tmp_path / "full", data)
    assert sorted(losses(full)) == list(range(1, NUM_STEPS + 1))
    assert [e["step"] for e in full.evals] == [3, 6, 7]
    assert full.position == DataState(2, 1)

    with pytest.raises(Crash):
        run(toy, jit, tmp_path / "resumed", crash_after(data, 5))
    with Checkpointer(tmp_path / "resumed") as ckpt:
        assert ckpt.latest_step() == 4  # saved at 2 and 4; batch 6 never arrived
    resumed, latest = run(toy, jit, tmp_path / "resumed", data)
    assert latest == NUM_STEPS
    assert sorted(losses(resumed)) == [5, 6, 7]
    for s in (5, 6, 7):
        assert losses(resumed)[s] == losses(full)[s]  # bit-identical
    assert resumed.position == full.position
    assert resumed.best_score == full.best_score == max(e["score"] for e in full.evals)
    final_full = jit.unreplicate(full.state)
    for a, b in zip(jax.tree_util.tree_leaves(jit.unreplicate(resumed.state)),
                    jax.tree_util.tree_leaves(final_full)):
        np.testing.assert_array_equal(a, b)

    # a checkpoint written under jit resumes under pmap (same numbers up to reduction order)
    with pytest.raises(Crash):
        run(toy, jit, tmp_path / "cross", crash_after(data, 5))
    cross, _ = run(toy, make_strategy("pmap"), tmp_path / "cross", data)
    np.testing.assert_allclose([losses(cross)[s] for s in (5, 6, 7)],
                               [losses(full)[s] for s in (5, 6, 7)], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(make_strategy("pmap").unreplicate(cross.state)),
                    jax.tree_util.tree_leaves(final_full)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # a finished run started again does nothing
    again, _ = run(toy, jit, tmp_path / "full", data)
    assert again.history == [] and int(jit.unreplicate(again.state.step)) == NUM_STEPS


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
