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
