"""Orbax checkpoints: round trip, keep-N, interrupted saves are not listed, best record,
no frozen weights written."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from compacter_jax.train.checkpoint import Checkpointer
from compacter_jax.train.state import TrainState


def trained_state(toy, steps=2):
    """A state after `steps` Adam updates with random gradients (no model compile needed)."""
    tx = optax.adam(1e-2)
    state = TrainState.create(toy.trainable, tx, 7)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        grads = jax.tree_util.tree_map(lambda x: rng.normal(size=x.shape).astype(x.dtype),
                                       state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, opt_state=opt_state,
                              params=optax.apply_updates(state.params, updates))
    return state, TrainState.create(toy.trainable, tx, 0)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_keep_n_and_partial_saves(toy, tmp_path):
    state, template = trained_state(toy)
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.restore_latest(template) is None
        for s in (1, 2, 3):
            meta = {"data_position": {"epoch": 0, "index": s}, "config": {"lr": 0.01}}
            assert ckpt.save(s, state.replace(step=jnp.int32(s)), meta)
        assert not ckpt.save(3, state, {})  # already saved: no-op
        ckpt.wait()
        assert ckpt.latest_step() == 3
        restored, meta = ckpt.restore_latest(template)
    assert meta == {"data_position": {"epoch": 0, "index": 3}, "config": {"lr": 0.01}}
    assert int(restored.step) == 3
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    assert_trees_equal(restored.rng, state.rng)
    steps_dir = tmp_path / "steps"
    assert sorted(p.name for p in steps_dir.iterdir() if p.name.isdigit()) == ["2", "3"]
    # An interrupted save: a complete-looking step 9 left under orbax's temporary name
    # (the rename is what finalises it) must not be picked up as the latest step.
    shutil.copytree(steps_dir / "3", steps_dir / "9.orbax-checkpoint-tmp-1700000000")
    with Checkpointer(tmp_path, max_to_keep=2) as again:
        assert again.latest_step() == 3
        assert int(again.restore_latest(template)[0].step) == 3


def test_checkpoint_holds_no_frozen_weights(toy, tmp_path):
    state, _ = trained_state(toy, steps=1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {})
    # read the saved tree back without a template: exactly what is on disk
    saved = ocp.StandardCheckpointer().restore(tmp_path / "steps" / "1" / "state")
    paths = {"/".join(k) for k in traverse_util.flatten_dict(saved)}
    assert {p.split("/")[0] for p in paths} == {"step", "params", "opt_state", "rng"}
    frozen_names = {k[0] for k in traverse_util.flatten_dict(toy.frozen)}
    assert frozen_names == {"shared", "encoder", "decoder"}
    assert not any(part in frozen_names for p in paths for part in p.split("/")), paths
    assert any(p.startswith("params/adapter/") for p in paths)


def test_best_record_keeps_only_improvements(toy, tmp_path):
    state, template = trained_state(toy, steps=1)
    with Checkpointer(tmp_path, best_mode="max") as ckpt:
        assert ckpt.save_best(10, state.params, 0.5, {"config": {"task": "rte"}})
        assert not ckpt.save_best(20, template.params, 0.4)
        assert not ckpt.save_best(25, template.params, float("nan"))
        better = jax.tree_util.tree_map(lambda x: x + 1, state.params)
        assert ckpt.save_best(30, better, 0.7)
        assert ckpt.best_score == 0.7
    with Checkpointer(tmp_path, best_mode="max") as ckpt:  # survives a restart
        assert ckpt.best_score == 0.7
        assert not ckpt.save_best(40, state.params, 0.6)
        params, meta = ckpt.restore_best(template.params)
    assert meta["step"] == 30 and meta["score"] == 0.7
    assert_trees_equal(params, better)
    with Checkpointer(tmp_path / "loss", best_mode="min") as ckpt:
        assert ckpt.save_best(1, state.params, 2.0) and ckpt.save_best(2, state.params, 1.0)
        assert not ckpt.save_best(3, state.params, 1.5)
    with pytest.raises(ValueError, match="best_mode"):
        Checkpointer(tmp_path / "x", best_mode="best")


# ---- reliability: nothing non-finite is written; corrupt checkpoints are set aside ----

def _poison(tree):
    """The same tree with one NaN in its first floating leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    leaves = [np.asarray(x).copy() for x in leaves]
    first = next(i for i, x in enumerate(leaves) if np.issubdtype(x.dtype, np.floating))
    leaves[first].flat[0] = np.nan
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_nonfinite_state_or_params_are_never_written(toy, tmp_path):
    from compacter_jax.train.checkpoint import NonFiniteStateError

    state, _ = trained_state(toy, steps=1)
    bad = state.replace(params=_poison(state.params))
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(NonFiniteStateError, match=r"training state at step 1 \(params/"):
            ckpt.save(1, bad, {})
        with pytest.raises(NonFiniteStateError, match="parameters at step 1"):
            ckpt.save_best(1, bad.params, 0.9)
        assert ckpt.best_score is None  # the refused best did not count
        assert ckpt.save(1, state, {})
        ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == ["1"]
    assert not any((tmp_path / "best").iterdir())


def _truncate_data(step_dir):
    for f in (step_dir / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _truncate_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text('{"data_pos')


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize("corrupt", [_truncate_data, _truncate_meta, _empty, "nan"])
def test_a_corrupt_newest_step_is_set_aside_and_the_previous_used(toy, tmp_path, corrupt,
                                                                  capfd):
    state, template = trained_state(toy)
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        ckpt.save(1, state.replace(step=jnp.int32(1)), {"at": 1})
        if corrupt == "nan":  # written behind the checkpointer's back (an older version, say)
            ckpt.wait()
            ckpt._steps.save(2, args=ocp.args.Composite(
                state=ocp.args.StandardSave(serialization_dict(state.replace(
                    params=_poison(state.params)))), meta=ocp.args.JsonSave({"at": 2})))
        else:
            ckpt.save(2, state.replace(step=jnp.int32(2)), {"at": 2})
    if corrupt != "nan":
        corrupt(tmp_path / "steps" / "2")
    with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
        restored, meta = ckpt.restore_latest(template)
        assert meta == {"at": 1} and int(restored.step) == 1
        assert len(ckpt.problems) == 1 and "steps/2 is unusable" in ckpt.problems[0]
        assert ckpt.latest_step() == 1
    kept = list((tmp_path / "set_aside").iterdir())  # moved, not deleted
    assert [p.name.split("-")[:2] for p in kept] == [["steps", "2"]]
    assert "Event loop is closed" not in capfd.readouterr().err
    with Checkpointer(tmp_path) as again:  # the next run starts from step 1 directly
        assert again.restore_latest(template)[1] == {"at": 1} and not again.problems


def serialization_dict(state):
    from flax import serialization

    return serialization.to_state_dict(state)


def test_a_corrupt_best_record_is_set_aside_up_front(toy, tmp_path):
    state, template = trained_state(toy, steps=1)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save_best(4, state.params, 0.5)
    (tmp_path / "best" / "4" / "meta" / "metadata").write_text("{")
    with Checkpointer(tmp_path) as ckpt:  # noticed when the run starts, not after training
        assert ckpt.best_score is None and ckpt.best_step is None
        assert "best/4 is unusable" in ckpt.problems[0]
        assert ckpt.restore_best(template.params) is None
        assert ckpt.save_best(6, state.params, 0.1)
    with Checkpointer(tmp_path) as ckpt:
        for f in (tmp_path / "best" / "6" / "params" / "d").iterdir():
            f.write_bytes(b"")
        assert ckpt.best_score == 0.1  # the meta is fine; the params are not
        assert ckpt.restore_best(template.params) is None
        assert ckpt.best_score is None and "best/6 is unusable" in ckpt.problems[0]
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "set_aside").iterdir()) == ["4", "6"]


def test_a_step_save_waits_for_the_pending_best_save(toy, tmp_path):
    state, _ = trained_state(toy, steps=1)
    calls = []
    with Checkpointer(tmp_path) as ckpt:
        real_wait, real_save = ckpt._best.wait_until_finished, ckpt._steps.save
        ckpt._best.wait_until_finished = lambda: (calls.append("best committed"), real_wait())
        ckpt._steps.save = lambda *a, **k: (calls.append("step save"), real_save(*a, **k))[1]
        ckpt.save_best(3, state.params, 0.5)
        calls.append("best issued")
        ckpt.save(3, state, {})
    issued, step_save = calls.index("best issued"), calls.index("step save")
    assert "best committed" in calls[issued:step_save], calls
