"""Data parallelism: 1 device, jit over 4 devices (replicated or FSDP-sharded frozen) and pmap
over 4 devices give the same losses and parameters, dropout included."""

import jax
import numpy as np
import pytest
from train_toy import make_batch

from compacter_jax.train.optim import make_optimizer
from compacter_jax.train.parallel import init_distributed, make_strategy
from compacter_jax.train.state import TrainState
from compacter_jax.peft import partition
from compacter_jax.train.step import make_eval_step, make_train_step

STEPS = 4


def run(toy, strategy, batches, tx, schedule, per_example_dropout=False):
    step = strategy.compile_train_step(make_train_step(
        toy.apply_fn, tx, merge_fn=partition.merge, schedule=schedule,
        per_example_dropout=per_example_dropout))
    state = strategy.replicate(TrainState.create(toy.trainable, tx, 0))
    frozen = strategy.put_frozen(toy.frozen)
    if getattr(strategy, "shard_frozen", False):  # FSDP really splits the toy's frozen leaves
        assert not any(x.sharding.is_fully_replicated for x in jax.tree_util.tree_leaves(frozen))
    metrics = []
    for b in batches:
        state, m = step(state, frozen, strategy.shard_batch(b))
        metrics.append(strategy.unreplicate(m))
    ev = strategy.compile_eval_step(make_eval_step(toy.apply_fn, merge_fn=partition.merge))
    padded = dict(batches[0], example_mask=np.array([1] * 6 + [0] * 2, np.int32))
    sums = strategy.unreplicate(ev(state.params, frozen, strategy.shard_batch(padded)))
    return metrics, strategy.unreplicate(state), sums


def test_one_device_jit_and_pmap_agree(toy):
    """The library's default dropout (masks keyed by global row; the model sees its shard):
    pmap over 4 devices draws the masks of one device. (per_example_dropout=True, the model
    vmapped over rows, is checked the same way on the T5 in test_train_parallel_t5.py.)"""
    assert jax.device_count() == 4, "tests/conftest.py should provide 4 CPU devices"
    tx, schedule = make_optimizer(1e-2, 1, 10)
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, 8) for _ in range(STEPS)]
    go = lambda s: run(toy, s, batches, tx, schedule)  # noqa: E731
    runs = {
        "1dev": go(make_strategy("jit", jax.devices()[:1])),
        "jit4": go(make_strategy("jit")),
        "jit4_fsdp": go(make_strategy("jit", shard_frozen=True, min_shard_elements=1)),
        "pmap4": go(make_strategy("pmap")),
    }
    ref_metrics, ref_state, ref_eval = runs["1dev"]
    assert int(ref_state.step) == STEPS
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree_util.tree_leaves(ref_state.params),
                                                     jax.tree_util.tree_leaves(toy.trainable)))
    assert moved > 1e-3  # training did change the params, so equality below means something
    for name, (metrics, state, ev) in runs.items():
        for k in ("loss", "tokens", "grad_norm", "learning_rate"):
            np.testing.assert_allclose([m[k] for m in metrics], [m[k] for m in ref_metrics],
                                       rtol=1e-5, err_msg=f"{name} {k}")
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(ref_state)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        for k in ("loss_sum", "tokens", "examples"):
            np.testing.assert_allclose(ev[k], ref_eval[k], rtol=1e-5, err_msg=f"{name} eval {k}")
    assert ref_eval["examples"] == 6


def test_layouts_and_errors(toy):
    jit, pmap = make_strategy("jit"), make_strategy("pmap")
    b = make_batch(np.random.default_rng(1), 8)
    assert jit.shard_batch(b)["input_ids"].shape == (8, 6)
    assert pmap.shard_batch(b)["input_ids"].shape == (4, 2, 6)
    np.testing.assert_array_equal(np.asarray(pmap.shard_batch(b)["labels"]).reshape(8, -1),
                                  b["labels"])
    with pytest.raises(ValueError, match="multiple of its 4 devices"):
        jit.shard_batch(make_batch(np.random.default_rng(1), 6))
    with pytest.raises(ValueError, match="unknown parallel strategy"):
        make_strategy("dp")
    with pytest.raises(ValueError, match="shard_frozen"):
        make_strategy("pmap", shard_frozen=True)
    # FSDP: a large frozen leaf is split over the 4 devices on its largest divisible dim
    fsdp = make_strategy("jit", shard_frozen=True)
    big = fsdp.put_frozen({"w": np.ones((512, 256), np.float32), "s": np.ones(8, np.float32)})
    assert big["w"].sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert big["w"].addressable_shards[0].data.shape == (128, 256)
    assert big["s"].sharding.is_fully_replicated
    # replicate / unreplicate round trip, both layouts; host values beside device ones (the
    # CLI adds each batch's token fill to the step's metrics) come back as they are.
    tree = {"a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for s in (jit, pmap):
        np.testing.assert_array_equal(s.unreplicate(s.replicate(tree))["a"], tree["a"])
        mixed = s.unreplicate({**s.replicate(tree), "fill": 0.75, "n": np.int32(3)})
        assert float(mixed["fill"]) == 0.75 and int(mixed["n"]) == 3


def test_jit_step_donates_the_state(toy_no_dropout):
    toy = toy_no_dropout
    tx, _ = make_optimizer(1e-3, 1, 10)
    s = make_strategy("jit")
    state = s.replicate(TrainState.create(toy.trainable, tx, 0))
    step = s.compile_train_step(make_train_step(toy.apply_fn, tx, merge_fn=partition.merge))
    old_leaf = jax.tree_util.tree_leaves(state.params)[0]
    new_state, _ = step(state, s.put_frozen(toy.frozen),
                        s.shard_batch(make_batch(np.random.default_rng(2), 4)))
    assert old_leaf.is_deleted()
    assert not jax.tree_util.tree_leaves(new_state.params)[0].is_deleted()


def test_init_distributed_is_a_noop_on_one_process(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert init_distributed() is False
    assert jax.process_count() == 1


def test_init_distributed_refuses_incomplete_settings_before_joining(monkeypatch):
    from compacter_jax.train.parallel import DISTRIBUTED_ENV

    for name in DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"num_processes, process_id not set \(set all three "
                                         r"of --config.coordinator_address"):
        init_distributed("127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"\$JAX_NUM_PROCESSES='two' is not an integer"):
        init_distributed()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"process_id 2 is not in 0..1"):
        init_distributed("127.0.0.1:1234", process_id=2)
    assert not jax.distributed.is_initialized()
