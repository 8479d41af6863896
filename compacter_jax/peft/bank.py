"""Adapter banks: K adapters of one method on one frozen backbone, chosen per example.

A *bank* is the trainable tree of a method with a leading task axis K on every leaf
(`stack_adapters([trainable_0, ..., trainable_{K-1}])`; `slice_adapter(bank, k)` is the exact
inverse). Every trainable piece of the method is banked (but leaves it shares, below):
Compacter's shared PHM rule, the PHM factors and biases, dense adapter weights, the trained
layer-norm scales, soft prompts, LoRA factors, BitFit biases. The frozen backbone is shared and
never copied.

A batch carries `task_ids` [B] (int32, 0..K-1; -1 for an empty packed row). The banked apply
gathers each example's adapter and vmaps the *unchanged* model over examples:

    logits[b] = apply_fn(method.combine(bank[task_ids[b]], frozen), example_b[None])[0]

i.e. `jax.vmap(..., in_axes=(0, None, 0))` over (gathered adapters, frozen tree, examples). No
method needs code of its own. Because the frozen tree is not batched, JAX's batching rule
keeps every frozen projection a plain matmul over all B examples (the example axis folds into
the matmul's rows): only the adapters' own, small matmuls become batched matmuls
(`tests/peft/test_bank.py` checks the jaxpr; `benchmarks/banks.py` times it against a plain
batch). The cost is the gathered copy, B x (adapter size), per call: 0.4 MB per example for
Compacter++ on T5-base.

Packed rows (several examples per row) work when each row holds one task
(`compacter_jax.data.pack_batch(..., task_ids)` packs that way and returns `task_ids` per row).
Dropout: `rngs` keys are folded with the example's row, so examples draw their own masks.

Shared leaves: a method may declare trainable leaves shared across the tasks of a bank
(`Method.shared_across_tasks`; multi-task ATTEMPT's attention module). `shared_paths(method,
trainable)` lists them; a bank built with `shared=` keeps such a leaf single (no task axis),
every task's rows use it, and `slice_adapter(bank, k, shared)` gives task k's full tree (what
a single-task run of the method trains, so it exports and reloads as one). Functions taking
`shared` default to none: a bank stacked from independently trained adapters (`serve`) holds
every leaf per task; a method that shares leaves (ATTEMPT) is refused without them shared.

Methods whose training changes the shared backbone (full fine-tuning trains it; Intrinsic-SAID
projects its vector onto every weight) have `bankable = False` and are refused
(`check_bankable`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models import T5ForConditionalGeneration
from compacter_jax.models.generation import _generate
from compacter_jax.peft.method import Method

TASK_IDS = "task_ids"
BankApplyFn = Callable[..., jax.Array]  # (bank, frozen, batch, deterministic, rngs, row_offset=0)


class BankError(ValueError):
    """Adapters that cannot be banked together, or a method that cannot be banked."""


def check_bankable(method: Method, shared: "SharedPaths" = frozenset()) -> None:
    """Raises BankError when `method`'s trainable parameters cannot be split per task.

    A method that is not bankable with every leaf per task may be with its shared leaves kept
    single: `shared` non-empty and all marked by the method (`shared_paths`, multi-task
    ATTEMPT) passes."""
    if shared and all(method.shared_across_tasks(p) for p in shared):
        return
    reason = getattr(type(method), "bank_refusal", "")
    if not type(method).bankable and reason:
        raise BankError(f"method {method.name!r} ({type(method).__name__}) cannot be banked: "
                        f"{reason}")
    if not type(method).bankable:
        raise BankError(
            f"method {method.name!r} ({type(method).__name__}) cannot be banked: what it trains "
            "changes the shared backbone (full fine-tuning trains the backbone itself; "
            "Intrinsic-SAID's vector moves every backbone weight), so K tasks cannot share one "
            "frozen backbone. Use a method that inserts modules (e.g. compacter++, adapter, "
            "lora, bitfit, prompt_tuning).")


# ----------------------------------------------------------------------- bank layout

SharedPaths = frozenset  # of parameter path tuples, e.g. ("encoder", "prompt", "up", "kernel")


def _flat(tree: Any) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(dict(tree)) if isinstance(tree, Mapping) else {(): tree}


def shared_paths(method: Method, trainable: Any) -> SharedPaths:
    """The paths of `trainable` (one adapter of `method`) that a multi-task bank keeps single:
    those `method.shared_across_tasks` marks (none for most methods)."""
    return frozenset(p for p in _flat(trainable) if method.shared_across_tasks(p))


def _names(keypath) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


def _per_task(fn: Callable, bank: Any, shared: SharedPaths) -> Any:
    """`fn` applied to the leaves with a task axis, shared leaves as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if _names(p) in shared else fn(x), bank)


def stack_adapters(trainables: Sequence[Any], shared: SharedPaths = frozenset()) -> Any:
    """K trainable trees of one method and backbone -> one bank (leading axis K on every leaf
    but the shared ones).

    Args:
      trainables: K >= 1 nested dicts with the same paths, shapes and dtypes.
      shared: paths kept single (`shared_paths`); the K trees must hold equal values there.
    Returns:
      The bank: the same nested dict with leaves [K, *shape] (jax arrays, dtypes kept), the
      shared leaves [*shape].
    Raises BankError naming the adapter index and parameter path that differ.
    """
    if not trainables:
        raise BankError("stack_adapters needs at least one adapter")
    flats = [_flat(t) for t in trainables]
    ref = flats[0]
    for k, flat in enumerate(flats[1:], start=1):
        missing, extra = sorted(set(ref) - set(flat)), sorted(set(flat) - set(ref))
        if missing or extra:
            raise BankError(f"adapter {k} has other parameters than adapter 0 (missing "
                            f"{['/'.join(p) for p in missing[:3]]}, unexpected "
                            f"{['/'.join(p) for p in extra[:3]]}): all adapters of a bank must "
                            "come from one method and one backbone")
        for path, x in flat.items():
            want = ref[path]
            if np.shape(x) != np.shape(want) or jnp.result_type(x) != jnp.result_type(want):
                raise BankError(f"adapter {k}: {'/'.join(path)} is {jnp.result_type(x)}"
                                f"{list(np.shape(x))}, adapter 0 has {jnp.result_type(want)}"
                                f"{list(np.shape(want))}")
    unequal = [p for p in ref if p in shared
               and not all(np.array_equal(np.asarray(f[p]), np.asarray(ref[p])) for f in flats)]
    if unequal:
        raise BankError(f"{'/'.join(unequal[0])} is shared across the bank's tasks but the "
                        "adapters hold different values there; a bank of separately trained "
                        "adapters keeps every leaf per task (leave shared empty)")
    stacked = {p: jnp.asarray(ref[p]) if p in shared else
               jnp.stack([jnp.asarray(f[p]) for f in flats]) for p in ref}
    if list(stacked) == [()]:
        return stacked[()]
    return traverse_util.unflatten_dict(stacked)


def bank_size(bank: Any, shared: SharedPaths = frozenset()) -> int:
    """K, the number of adapters in `bank`."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map_with_path(
        lambda p, x: None if _names(p) in shared else x, bank))
    if not leaves:
        raise BankError("the bank has no parameters")
    return int(np.shape(leaves[0])[0])


def slice_adapter(bank: Any, k: int, shared: SharedPaths = frozenset()) -> Any:
    """Adapter `k` of `bank` (the exact inverse of `stack_adapters`: same values and dtypes;
    shared leaves included as they are)."""
    size = bank_size(bank, shared)
    if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < size:
        raise BankError(f"adapter index {k!r} out of range: the bank holds {size} adapters")
    return _per_task(lambda x: x[int(k)], bank, shared)


def gather_adapters(bank: Any, task_ids: jax.Array, shared: SharedPaths = frozenset()) -> Any:
    """Each example's adapter: leaves [B, *shape] from `bank` [K, *shape] and task_ids [B]
    (shared leaves as they are).

    Negative ids (empty packed rows) take adapter 0; their rows carry no tokens."""
    ids = jnp.maximum(jnp.asarray(task_ids, jnp.int32), 0)
    return _per_task(lambda x: jnp.take(x, ids, axis=0, mode="clip"), bank, shared)


def _task_axes(bank: Any, shared: SharedPaths) -> Any:
    """vmap's in_axes for a gathered bank: 0 per task, None for shared leaves."""
    return jax.tree_util.tree_map_with_path(lambda p, x: None if _names(p) in shared else 0,
                                            bank)


# ------------------------------------------------------------------------ banked apply


def make_bank_apply(apply_fn: Callable, method: Method,
                    shared: SharedPaths = frozenset()) -> BankApplyFn:
    """The banked version of a model's `apply_fn` (the train step's convention).

    Args:
      apply_fn: `apply_fn(params, batch, deterministic, rngs) -> logits [B, T, V]`, e.g.
        `compacter_jax.train.seq2seq_apply_fn(model)`; it must not mix examples (T5 does not).
      method: the (bankable) method whose `combine(trainable, frozen)` builds the params.
      shared: the bank's leaves without a task axis (`stack_adapters(..., shared)`).
    Returns:
      `bank_apply(bank, frozen, batch, deterministic, rngs, row_offset=0) -> logits` float32
      [B, T, V]; `batch` holds `task_ids` [B] besides the model's keys. Each example is
      computed with its task's adapter; `rngs` ({"dropout": key} or None) are folded with the
      row's index in the global batch (`row_offset` + local row: a device's shard under pmap
      passes its offset, so pmap draws the masks of one device and of jit).
    """
    check_bankable(method, shared)

    def one(trainable, frozen, example, keys, deterministic):
        single = jax.tree_util.tree_map(lambda x: x[None], example)
        return apply_fn(method.combine(trainable, frozen), single, deterministic, keys)[0]

    def bank_apply(bank, frozen, batch, deterministic=True, rngs=None, row_offset=0):
        if TASK_IDS not in batch:
            raise BankError("a banked batch needs 'task_ids' [B] (one adapter index per row)")
        task_ids = batch[TASK_IDS]
        examples = {k: v for k, v in batch.items() if k != TASK_IDS}
        rows = row_offset + jnp.arange(task_ids.shape[0], dtype=jnp.int32)
        keys = None
        if rngs:
            keys = {name: jax.vmap(lambda r, key=key: jax.random.fold_in(key, r))(rows)
                    for name, key in rngs.items()}
        fn = functools.partial(one, deterministic=deterministic)
        in_axes = (_task_axes(bank, shared), None, 0, 0 if keys else None)
        return jax.vmap(fn, in_axes=in_axes)(gather_adapters(bank, task_ids, shared), frozen,
                                             examples, keys)

    return bank_apply


# ---------------------------------------------------------------------- banked decoding


def _bank_generate(model, method, max_new_tokens, eos_id, shared, bank, frozen, task_ids,
                   input_ids, attention_mask):
    def one(trainable, ids, mask):
        params = method.combine(trainable, frozen)
        return _generate(model, max_new_tokens, eos_id, params, ids[None], mask[None])[0]

    return jax.vmap(one, in_axes=(_task_axes(bank, shared), 0, 0))(
        gather_adapters(bank, task_ids, shared), input_ids, attention_mask)


@functools.lru_cache(maxsize=32)
def _compiled_generate(model, method, max_new_tokens, eos_id, shared=frozenset()):
    return jax.jit(functools.partial(_bank_generate, model, method, max_new_tokens, eos_id,
                                     shared))


def bank_greedy_generate(model: T5ForConditionalGeneration, method: Method, bank: Any,
                         frozen: Any, task_ids: Any, input_ids: Any, attention_mask: Any,
                         max_new_tokens: int, eos_id: int = 1,
                         shared: SharedPaths = frozenset()) -> jax.Array:
    """Greedy decoding with the KV cache, each example with its task's adapter.

    The library's decoding loop (`models.greedy_generate`) vmapped over examples: every
    example gets its own cache and its gathered adapter; the loop runs until every row has
    produced EOS or `max_new_tokens` tokens. One compiled program per (B, S) shape.

    Args:
      model: the T5 with `method`'s hooks; bank, frozen: the banked trainable tree and the
        shared frozen tree; task_ids: int [B] in 0..K-1; input_ids, attention_mask: int [B, S];
        shared: the bank's leaves without a task axis.
    Returns:
      int32 [B, max_new_tokens]: generated tokens (no start token), 0 after a row's EOS; row
      b equals `greedy_generate(model, method.combine(slice_adapter(bank, task_ids[b]),
      frozen), ...)` for that row.
    """
    check_bankable(method, shared)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = np.asarray(task_ids)
    size = bank_size(bank, shared)
    if ids.ndim != 1 or ids.shape[0] != np.shape(input_ids)[0]:
        raise BankError(f"task_ids has shape {ids.shape}; expected [{np.shape(input_ids)[0]}] "
                        "(one adapter index per row of input_ids)")
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise BankError(f"task_ids must lie in 0..{size - 1} (the bank holds {size} adapters), "
                        f"got {sorted(set(ids.tolist()))[:8]}")
    # No shared leaves: the 4-argument cache key, the one callers without them use.
    extra = (frozenset(shared),) if shared else ()
    fn = _compiled_generate(model, method, int(max_new_tokens), int(eos_id), *extra)
    return fn(bank, frozen, jnp.asarray(ids, jnp.int32), jnp.asarray(input_ids, jnp.int32),
              jnp.asarray(attention_mask, jnp.int32))
