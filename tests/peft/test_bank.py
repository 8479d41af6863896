"""Adapter banks: per-example logits equal the single-adapter model's, for every bankable
preset (scanned and unscanned); stack/slice are exact inverses; frozen projections stay plain
matmuls; packed rows, a jit Mesh, bfloat16 and banked greedy decoding."""

from __future__ import annotations

import functools

import flax.traverse_util as traverse_util
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from compacter_jax import peft
from compacter_jax.data import pack_batch
from compacter_jax.models import (T5ForConditionalGeneration, get_preset, greedy_generate,
                                  init_fn, param_shapes, shift_right)
from compacter_jax.peft import bank as bank_lib
from compacter_jax.train import make_strategy, seq2seq_apply_fn

TINY = get_preset("t5-tiny").replace(vocab_size=64, d_ff=64, num_heads=2, d_kv=16)
# Presets shrunk to fit the tiny T5 (bottleneck 8 = 64 / 8; two blocks; short prompts).
FIT = {"adapter": {}, "pfeiffer": {}, "adapterdrop": {"drop_first": 1}, "lowrank": {},
       "phm_adapter": {"n": 4}, "compacter": {}, "compacter++": {}, "bitfit": {},
       "prompt_tuning": {"length": 3}, "lora": {"rank": 2}, "bitfit_projections": {},
       "prompt_tuning_vocab": {"length": 3}, "lst": {"reduction_factor": 4, "drop_every": 0},
       "sparse_adapter": {}, "large_sparse_adapter": {}}
BANKABLE = [name for name, m in peft.PRESETS.items() if type(m).bankable]
K = 3
# Tests compile many tiny programs: unoptimised XLA code compiles several times faster.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
TASK_IDS = np.array([0, 2, 1, 2, 0], np.int32)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """XLA skips its slow optimisation passes: compile time dominates these tiny programs."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_every_preset_but_full_is_bankable_and_fits_here():
    assert sorted(BANKABLE) == sorted(FIT) and "full" not in BANKABLE


def _method(name):
    overrides = dict(FIT[name])
    if isinstance(peft.PRESETS[name], peft.AdapterMethod):
        overrides["reduction_factor"] = 8
    return peft.get_method(name, **overrides)


def _model(method, scan=False, dtype="float32"):
    """The tiny T5 with `method`, its params drawn with numpy (no compiled init: fast)."""
    cfg = TINY.replace(scan_layers=scan, dtype=dtype)
    model = T5ForConditionalGeneration(cfg, method.hooks(dtype=dtype))
    rs = np.random.RandomState(0)
    flat = traverse_util.flatten_dict(param_shapes(model))
    params = {}
    for path, spec in sorted(flat.items()):
        if path[-1] == "scale":
            value = 1.0 + 0.1 * rs.randn(*spec.shape)
        else:
            fan_in = spec.shape[-2] if len(spec.shape) >= 2 else 16
            value = rs.randn(*spec.shape) / np.sqrt(fan_in)
        params[path] = jnp.asarray(value, spec.dtype)
    return model, method.prepare(traverse_util.unflatten_dict(params), cfg)


def _adapters(trainable, k=K, scale=0.05):
    """K distinct adapters: the init plus noise on every leaf (LoRA's B, BitFit are zero)."""
    out = []
    for i in range(k):
        rs = np.random.RandomState(10 + i)
        out.append(jax.tree_util.tree_map(
            lambda x: x + jnp.asarray(scale * rs.randn(*x.shape), x.dtype), trainable))
    return out


def _batch(n=5, src=7, tgt=4, seed=0):
    rs = np.random.RandomState(seed)
    src_len, tgt_len = rs.randint(2, src + 1, n), rs.randint(1, tgt + 1, n)
    mask = (np.arange(src)[None] < src_len[:, None]).astype(np.int32)
    dmask = (np.arange(tgt)[None] < tgt_len[:, None]).astype(np.int32)
    ids = rs.randint(2, TINY.vocab_size, (n, src)).astype(np.int32) * mask
    labels = rs.randint(2, TINY.vocab_size, (n, tgt)).astype(np.int32) * dmask
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "decoder_input_ids": shift_right(labels).astype(np.int32),
            "decoder_attention_mask": dmask}


def _banked_and_reference(model, method, adapters, frozen, batch, strategy=None):
    """(banked logits, reference logits) [B, T, V] from one compiled program. The reference
    runs the plain, unbanked model on the whole batch once per adapter (`lax.map`) and keeps,
    for each row, the logits of that row's adapter. `strategy`: run on its mesh (bank and
    frozen tree replicated, batch rows sharded); the banked logits must stay sharded."""
    apply_fn = seq2seq_apply_fn(model)
    bank_apply = bank_lib.make_bank_apply(apply_fn, method)
    plain = {k: v for k, v in batch.items() if k != "task_ids"}

    def both(bank, frozen, batch):
        banked = bank_apply(bank, frozen, batch, True)
        per_adapter = jax.lax.map(
            lambda t: apply_fn(method.combine(t, frozen), plain, True, None), bank)
        rows = jnp.arange(batch["task_ids"].shape[0])
        return banked, per_adapter[jnp.maximum(batch["task_ids"], 0), rows]

    bank = bank_lib.stack_adapters(adapters)
    if strategy is not None:
        bank, frozen = strategy.replicate(bank), strategy.put_frozen(frozen)
        batch = strategy.shard_batch(batch)
    got, want = fast_jit(both)(bank, frozen, batch)
    if strategy is not None:
        assert got.sharding.spec[0] == "data"  # rows stay sharded through the vmap
    return np.asarray(got), np.asarray(want)


def _check_bank(name, scan):
    method = _method(name)
    if scan and not method.hooks().uniform_over_layers():
        with pytest.raises(ValueError, match="uniform_over_layers"):
            jax.eval_shape(init_fn(T5ForConditionalGeneration(TINY.replace(scan_layers=True),
                                                              method.hooks())),
                           jax.random.PRNGKey(0))
        return
    model, params = _model(method, scan)
    trainable, frozen = method.partition(params)
    adapters = _adapters(trainable)
    got, want = _banked_and_reference(model, method, adapters, frozen,
                                      {**_batch(), "task_ids": TASK_IDS})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The adapters differ enough that a wrong gather would show.
    assert np.abs(want[0] - want[2]).max() > 1e-3


# Representative cases run by default: prompt tuning scanned here; the packed-on-a-mesh,
# bfloat16 and decoding tests below add compacter++ scanned and compacter unscanned. The whole
# preset matrix is `long` (22 compiled tiny T5 programs: about 3 minutes on 2 busy cores).
QUICK = {("prompt_tuning", True), ("adapterdrop", True)}
MATRIX = [pytest.param(name, scan, marks=() if (name, scan) in QUICK else pytest.mark.long,
                       id=f"{name}-{'scanned' if scan else 'unscanned'}")
          for name in sorted(FIT) for scan in (False, True)]


@pytest.mark.parametrize("name,scan", MATRIX)
def test_banked_logits_equal_single_adapter_logits(name, scan):
    _check_bank(name, scan)


def test_stack_and_slice_are_exact_inverses():
    method = _method("compacter++")
    trainable, _ = method.partition(_model(method, scan=True)[1])
    adapters = _adapters(trainable)
    adapters[1] = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype),
                                         adapters[1])
    bank = bank_lib.stack_adapters(adapters)
    assert bank_lib.bank_size(bank) == K
    for k in range(K):
        for got, want in zip(jax.tree_util.tree_leaves(bank_lib.slice_adapter(bank, k)),
                             jax.tree_util.tree_leaves(adapters[k])):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    again = bank_lib.stack_adapters([bank_lib.slice_adapter(bank, k) for k in range(K)])
    for got, want in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(bank)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(bank_lib.BankError, match="out of range"):
        bank_lib.slice_adapter(bank, K)


def test_adapters_that_do_not_match_are_refused():
    method = _method("compacter++")
    trainable, _ = method.partition(_model(method)[1])
    other = peft.get_method("lora", rank=2).partition(_model(_method("lora"))[1])[0]
    with pytest.raises(bank_lib.BankError, match="adapter 1 has other parameters"):
        bank_lib.stack_adapters([trainable, other])
    wide = _method("compacter++").replace(reduction_factor=4)
    with pytest.raises(bank_lib.BankError,
                       match=r"adapter 1: .* is float32.*adapter 0 has float32"):
        bank_lib.stack_adapters([trainable, wide.partition(_model(wide)[1])[0]])
    with pytest.raises(bank_lib.BankError, match="at least one"):
        bank_lib.stack_adapters([])


def test_full_fine_tuning_is_refused():
    full = peft.get_method("full")
    with pytest.raises(bank_lib.BankError, match="'full' .* cannot be banked"):
        bank_lib.make_bank_apply(lambda *a: None, full)
    with pytest.raises(bank_lib.BankError, match="cannot be banked"):
        bank_lib.check_bankable(full)
    with pytest.raises(bank_lib.BankError, match="'intrinsic_said' .* cannot be banked"):
        bank_lib.check_bankable(peft.get_method("intrinsic_said"))


def _dot_generals(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _dot_generals(sub)


def test_frozen_projections_stay_plain_matmuls():
    """Under the vmap, a matmul with a frozen kernel has no batch dimension: the examples fold
    into its rows, as in a plain batch. Only the adapters' own matmuls are batched."""
    method = _method("compacter++")
    model, params = _model(method, scan=True)
    trainable, frozen = method.partition(params)
    bank = bank_lib.stack_adapters(_adapters(trainable))
    batch = {**_batch(), "task_ids": TASK_IDS}
    bank_apply = bank_lib.make_bank_apply(seq2seq_apply_fn(model), method)
    jaxpr = jax.make_jaxpr(functools.partial(bank_apply, deterministic=True))(
        bank, frozen, batch).jaxpr
    kernels = {tuple(x.shape[1:]) for x in jax.tree_util.tree_leaves(frozen["encoder"]["blocks"])
               if x.ndim == 3}  # scanned kernels [layers, in, out]
    frozen_dots = batched_frozen = batched_other = 0
    for eqn in _dot_generals(jaxpr):
        (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
        rhs = tuple(eqn.invars[1].aval.shape)
        if rhs in kernels:
            frozen_dots += 1
            batched_frozen += bool(lhs_batch)
        elif lhs_batch:
            batched_other += 1
    assert frozen_dots >= 4 * 2 + 2  # q, k, v, o, wi, wo of both stacks (cross-attn too)
    assert batched_frozen == 0
    assert batched_other > 0  # attention and the per-example adapter matmuls


def test_packed_single_task_rows_jitted_over_a_mesh():
    """Packed rows (one task each), scanned layers, jit over the 4-device mesh with the rows
    sharded: every real target position has the logits of its own adapter."""
    method = _method("compacter++")
    model, params = _model(method, scan=True)
    trainable, frozen = method.partition(params)
    plain = _batch(n=6, seed=3)
    task_ids = np.array([1, 0, 1, 2, 0, 1], np.int32)
    packed = pack_batch({**plain, "task_ids": task_ids}, max_source_length=16,
                        packed_target_length=8, row_buckets=(4, 8))
    assert set(packed["task_ids"][packed["task_ids"] >= 0]) == {0, 1, 2}
    assert packed["input_ids"].shape[0] == 4  # rows really hold several examples
    strategy = make_strategy("jit")
    assert strategy.num_devices == 4
    got, want = _banked_and_reference(model, method, _adapters(trainable), frozen, packed,
                                      strategy)
    real = packed["decoder_attention_mask"] == 1
    assert real.sum() == plain["decoder_attention_mask"].sum()
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.long
def test_jit_over_a_mesh_with_the_batch_sharded():
    method = _method("lora")
    model, params = _model(method, scan=True)
    trainable, frozen = method.partition(params)
    strategy = make_strategy("jit")
    assert strategy.num_devices == 4
    batch = {**_batch(n=8, seed=1), "task_ids": np.array([0, 1, 2, 0, 1, 2, 2, 1], np.int32)}
    got, want = _banked_and_reference(model, method, _adapters(trainable), frozen, batch,
                                      strategy)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute():
    """bfloat16 compute, unscanned layers (the default suite's unscanned case)."""
    method = _method("compacter")
    model, params = _model(method, scan=False, dtype="bfloat16")
    trainable, frozen = method.partition(params)
    got, want = _banked_and_reference(model, method, _adapters(trainable), frozen,
                                      {**_batch(), "task_ids": TASK_IDS})
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # bfloat16 keeps 8 bits of mantissa: the banked and the plain program round alike but not
    # identically (other fusions); the logits are O(1).
    np.testing.assert_allclose(got, want, atol=0.1)
    assert np.mean(np.abs(got - want)) < 0.01


@pytest.mark.long
def test_dropout_masks_differ_per_example():
    method = _method("compacter++")
    model, params = _model(method)
    model = model.clone(config=model.config.replace(dropout_rate=0.5))
    trainable, frozen = method.partition(params)
    bank = bank_lib.stack_adapters([trainable, trainable])
    one = {k: np.repeat(v[:1], 2, axis=0) for k, v in _batch().items()}  # one example twice
    fn = fast_jit(bank_lib.make_bank_apply(seq2seq_apply_fn(model), method),
                  static_argnums=(3,))
    out = fn(bank, frozen, {**one, "task_ids": np.array([0, 1], np.int32)}, False,
             {"dropout": jax.random.PRNGKey(1)})
    assert np.abs(np.asarray(out[0] - out[1])).max() > 1e-3


@pytest.mark.parametrize("name,scan", [
    ("compacter++", True), pytest.param("prompt_tuning", False, marks=pytest.mark.long)])
def test_banked_greedy_decoding_equals_single_adapter_decoding(name, scan):
    method = _method(name)
    model, params = _model(method, scan)
    trainable, frozen = method.partition(params)
    adapters = _adapters(trainable, scale=0.5)
    bank = bank_lib.stack_adapters(adapters)
    batch = _batch(n=5, seed=2)
    got = np.asarray(bank_lib.bank_greedy_generate(
        model, method, bank, frozen, TASK_IDS, batch["input_ids"], batch["attention_mask"],
        max_new_tokens=5))
    distinct = set()
    for k in range(K):
        # The plain decoder on the whole batch with adapter k (one compiled shape).
        want = np.asarray(greedy_generate(model, method.combine(adapters[k], frozen),
                                          batch["input_ids"], batch["attention_mask"],
                                          max_new_tokens=5))
        rows = np.flatnonzero(TASK_IDS == k)
        np.testing.assert_array_equal(got[rows], want[rows])
        distinct.add(want.tobytes())
    assert len(distinct) == K  # the adapters decode differently: a wrong gather would show
    with pytest.raises(bank_lib.BankError, match=r"task_ids must lie in 0\.\.2"):
        bank_lib.bank_greedy_generate(model, method, bank, frozen, TASK_IDS + 1,
                                      batch["input_ids"], batch["attention_mask"], 2)
