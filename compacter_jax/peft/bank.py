"""Adapter banks: K adapters of one method on one frozen backbone, chosen per example.

A *bank* is the trainable tree of a method with a leading task axis K on every leaf
(`stack_adapters([trainable_0, ..., trainable_{K-1}])`; `slice_adapter(bank, k)` is the exact
inverse). Every trainable piece of the method is banked: Compacter's shared PHM rule, the PHM
factors and biases, dense adapter weights, the trained layer-norm scales, soft prompts, LoRA
factors, BitFit biases. The frozen backbone is shared and never copied.

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


def check_bankable(method: Method) -> None:
    """Raises BankError when `method`'s trainable parameters cannot be split per task."""
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


def _flat(tree: Any) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(dict(tree)) if isinstance(tree, Mapping) else {(): tree}


def stack_adapters(trainables: Sequence[Any]) -> Any:
    """K trainable trees of one method and backbone -> one bank (leading axis K on every leaf).

    Args:
      trainables: K >= 1 nested dicts with the same paths, shapes and dtypes.
    Returns:
      The bank: the same nested dict with leaves [K, *shape] (jax arrays, dtypes kept).
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
    stacked = {p: jnp.stack([jnp.asarray(f[p]) for f in flats]) for p in ref}
    if list(stacked) == [()]:
        return stacked[()]
    return traverse_util.unflatten_dict(stacked)


def bank_size(bank: Any) -> int:
    """K, the number of adapters in `bank`."""
    leaves = jax.tree_util.tree_leaves(bank)
    if not leaves:
        raise BankError("the bank has no parameters")
    return int(np.shape(leaves[0])[0])


def slice_adapter(bank: Any, k: int) -> Any:
    """Adapter `k` of `bank` (the exact inverse of `stack_adapters`: same values and dtypes)."""
    size = bank_size(bank)
    if not isinstance(k, (int, np.integer)) or not 0 <= int(k) < size:
        raise BankError(f"adapter index {k!r} out of range: the bank holds {size} adapters")
    return jax.tree_util.tree_map(lambda x: x[int(k)], bank)


def gather_adapters(bank: Any, task_ids: jax.Array) -> Any:
    """Each example's adapter: leaves [B, *shape] from `bank` [K, *shape] and task_ids [B].

    Negative ids (empty packed rows) take adapter 0; their rows carry no tokens."""
    ids = jnp.maximum(jnp.asarray(task_ids, jnp.int32), 0)
    return jax.tree_util.tree_map(lambda x: jnp.take(x, ids, axis=0, mode="clip"), bank)


# ------------------------------------------------------------------------ banked apply


def make_bank_apply(apply_fn: Callable, method: Method) -> BankApplyFn:
    """The banked version of a model's `apply_fn` (the train step's convention).

    Args:
      apply_fn: `apply_fn(params, batch, deterministic, rngs) -> logits [B, T, V]`, e.g.
        `compacter_jax.train.seq2seq_apply_fn(model)`; it must not mix examples (T5 does not).
      method: the (bankable) method whose `combine(trainable, frozen)` builds the params.
    Returns:
      `bank_apply(bank, frozen, batch, deterministic, rngs, row_offset=0) -> logits` float32
      [B, T, V]; `batch` holds `task_ids` [B] besides the model's keys. Each example is
      computed with its task's adapter; `rngs` ({"dropout": key} or None) are folded with the
      row's index in the global batch (`row_offset` + local row: a device's shard under pmap
      passes its offset, so pmap draws the masks of one device and of jit).
    """
    check_bankable(method)

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
        return jax.vmap(fn, in_axes=(0, None, 0, 0 if keys else None))(
            gather_adapters(bank, task_ids), frozen, examples, keys)

    return bank_apply


# ---------------------------------------------------------------------- banked decoding


def _bank_generate(model, method, max_new_tokens, eos_id, bank, frozen, task_ids, input_ids,
                   attention_mask):
    def one(trainable, ids, mask):
        params = method.combine(trainable, frozen)
        return _generate(model, max_new_tokens, eos_id, params, ids[None], mask[None])[0]

    return jax.vmap(one)(gather_adapters(bank, task_ids), input_ids, attention_mask)


@functools.lru_cache(maxsize=32)
def _compiled_generate(model, method, max_new_tokens, eos_id):
    return jax.jit(functools.partial(_bank_generate, model, method, max_new_tokens, eos_id))


def bank_greedy_generate(model: T5ForConditionalGeneration, method: Method, bank: Any,
                         frozen: Any, task_ids: Any, input_ids: Any, attention_mask: Any,
                         max_new_tokens: int, eos_id: int = 1) -> jax.Array:
    """Greedy decoding with the KV cache, each example with its task's adapter.

    The library's decoding loop (`models.greedy_generate`) vmapped over examples: every
    example gets its own cache and its gathered adapter; the loop runs until every row has
    produced EOS or `max_new_tokens` tokens. One compiled program per (B, S) shape.

    Args:
      model: the T5 with `method`'s hooks; bank, frozen: the banked trainable tree and the
        shared frozen tree; task_ids: int [B] in 0..K-1; input_ids, attention_mask: int [B, S].
    Returns:
      int32 [B, max_new_tokens]: generated tokens (no start token), 0 after a row's EOS; row
      b equals `greedy_generate(model, method.combine(slice_adapter(bank, task_ids[b]),
      frozen), ...)` for that row.
    """
    check_bankable(method)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = np.asarray(task_ids)
    size = bank_size(bank)
    if ids.ndim != 1 or ids.shape[0] != np.shape(input_ids)[0]:
        raise BankError(f"task_ids has shape {ids.shape}; expected [{np.shape(input_ids)[0]}] "
                        "(one adapter index per row of input_ids)")
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        raise BankError(f"task_ids must lie in 0..{size - 1} (the bank holds {size} adapters), "
                        f"got {sorted(set(ids.tolist()))[:8]}")
    fn = _compiled_generate(model, method, int(max_new_tokens), int(eos_id))
    return fn(bank, frozen, jnp.asarray(ids, jnp.int32), jnp.asarray(input_ids, jnp.int32),
              jnp.asarray(attention_mask, jnp.int32))
