"""Pure train / eval steps over (trainable, frozen) parameters.

`apply_fn` convention (every model plugged into training follows it):

    apply_fn(params, batch, deterministic, rngs) -> logits  float32 [B, T, vocab]

  params: the full (merged) parameter tree; batch: the dict of int32 arrays of DESIGN.md
  ("Batches"); deterministic: False in training (dropout on); rngs: {"dropout": key} or None.
  For the T5 (and any linen seq2seq model with that call signature): `seq2seq_apply_fn(model)`;
  packed batches (`encoder_segment_ids`, ... present) are passed through as keywords.

The loss is the token cross-entropy summed over real label tokens (`decoder_attention_mask`)
of the *global* batch divided by their number. Steps compute sums and counts and divide at the
end, so the result is the same for any sharding of the batch; under `pmap` pass
`axis_name="data"` and the sums are `psum`-reduced first.

`merge_fn(trainable, frozen) -> params` builds what `apply_fn` is applied with (a method's
`combine`, e.g. `compacter_jax.peft.merge` or Intrinsic-SAID's projection).

Dropout: every row of the global batch draws its masks from its own key,
`fold_in(layer_key, global_row)` with `layer_key` from `fold_in(state.rng, step)`
(`train/dropout.py`, for `flax.linen.Dropout`): a mask depends on the row only, not on which
device holds it, so 1 device, jit over N devices and pmap over N devices draw identical masks
(packed rows too). Only the mask draw is per row, so it costs what one key per step costs.
`per_example_dropout=True` instead vmaps the whole model over rows with a key each (for models
whose dropout is not linen's, e.g. NNX; each call sees a batch of 1, about 17% slower for
Compacter++ on CPU).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from compacter_jax.train.dropout import row_keyed_dropout
from compacter_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
ApplyFn = Callable[[Any, Batch, bool, "dict | None"], jax.Array]
MergeFn = Callable[[Any, Any], Any]
# Keys of a packed batch (several examples per row), passed to the model as keywords.
PACKING_KEYS = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids",
                "decoder_positions")
# Keys every train / eval batch holds (docs/DESIGN.md "Batches"; `compacter_jax.make_batch`).
BATCH_KEYS = ("input_ids", "attention_mask", "labels", "decoder_input_ids",
              "decoder_attention_mask")


class BatchKeyError(KeyError):
    """A batch lacks a key the step needs; the message names it and the expected keys."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def check_batch(batch: Batch, required: tuple[str, ...] = BATCH_KEYS) -> None:
    """Raises `BatchKeyError` naming the missing keys, the expected ones and the helper that
    builds them, when `batch` lacks a required key or holds only part of the packing keys."""
    if not isinstance(batch, Mapping):
        raise BatchKeyError(f"a batch is a dict of arrays, got {type(batch).__name__}")
    keys = set(batch)
    missing = [k for k in required if k not in keys]
    packing = [k for k in PACKING_KEYS if k in keys]
    if packing and len(packing) < len(PACKING_KEYS):
        missing += [k for k in PACKING_KEYS if k not in keys]
    if missing:
        raise BatchKeyError(
            f"batch is missing {', '.join(map(repr, missing))}; a batch holds "
            f"{', '.join(required)} (int32 [B, S] / [B, T]), plus all four of "
            f"{', '.join(PACKING_KEYS)} when packed; got keys {sorted(keys)}. Build one with "
            "compacter_jax.make_batch(tokenizer, sources, targets) (docs/DESIGN.md, Batches)")


def seq2seq_apply_fn(model) -> ApplyFn:
    """The `apply_fn` of a linen model called as `model.apply(variables, input_ids,
    attention_mask, decoder_input_ids, decoder_attention_mask, deterministic=..., rngs=...)`
    (`T5ForConditionalGeneration`)."""
    def apply_fn(params, batch, deterministic, rngs):
        packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
        return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                           batch["decoder_input_ids"], batch["decoder_attention_mask"],
                           deterministic=deterministic, rngs=rngs, **packing)
    return apply_fn


class NonFiniteLossError(FloatingPointError):
    """The training loss or gradient norm became NaN/inf; raised before any checkpoint save."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step = step
        super().__init__(
            f"non-finite training loss at update {step} (loss={loss}, grad_norm={grad_norm}); "
            "no checkpoint was written for it. Lower the learning rate, check the inputs of "
            "that batch, or use float32 parameters.")


def token_loss_sum(logits: jax.Array, labels: jax.Array, mask: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
    """Sum of token cross-entropies over real tokens, and their number.

    logits: [B, T, V] (any float dtype, computed in float32); labels: int [B, T];
    mask: [B, T], 1 for real tokens. Returns (float32 scalar sum, float32 scalar count).
    """
    if logits.shape[:-1] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"logits {logits.shape[:-1]}+[V], labels {labels.shape} and mask "
                         f"{mask.shape} must share [batch, len]")
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels.astype(jnp.int32))
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def loss_fn(logits: jax.Array, labels: jax.Array, mask: jax.Array
            ) -> tuple[jax.Array, jax.Array]:
    """(mean token cross-entropy over real tokens, number of real tokens), float32 scalars.

    An all-padding batch gives loss 0 (not NaN).
    """
    total, count = token_loss_sum(logits, labels, mask)
    return total / jnp.maximum(count, 1.0), count


def _global_rows(local_batch: int, axis_name: str | None) -> jax.Array:
    """Row indices of this shard's examples in the global batch, int32 [local_batch]."""
    offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
    return offset + jnp.arange(local_batch, dtype=jnp.int32)


def _forward_train(apply_fn: ApplyFn, params: Any, batch: Batch, key: jax.Array,
                   rows: jax.Array, per_example_dropout: bool) -> jax.Array:
    if not per_example_dropout:
        with row_keyed_dropout(rows):
            return apply_fn(params, batch, False, {"dropout": key})

    def one(example, row):
        single = jax.tree_util.tree_map(lambda x: x[None], example)
        logits = apply_fn(params, single, False, {"dropout": jax.random.fold_in(key, row)})
        return logits[0]

    return jax.vmap(one)(dict(batch), rows)


def make_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    merge_fn: MergeFn,
    schedule: optax.Schedule | None = None,
    per_example_dropout: bool = False,
) -> Callable[..., tuple[TrainState, dict]]:
    """Returns `train_step(state, frozen, batch, axis_name=None) -> (state, metrics)`.

    Only `state.params` (the trainable tree) is differentiated; `frozen` is an argument (a
    closed-over array would be baked into the compiled program as a constant). Metrics (float32
    scalars, identical on every device): loss (global token mean), tokens (global count),
    grad_norm (of the mean gradient, before clipping), finite (1.0 if loss and grad_norm are
    finite, else 0.0) and learning_rate (the rate of this update, when `schedule` is given).
    The step does not skip non-finite updates: the host loop must check `finite`
    (`raise_if_nonfinite`) before it saves anything.
    """

    def train_step(state: TrainState, frozen: Any, batch: Batch,
                   axis_name: str | None = None) -> tuple[TrainState, dict]:
        check_batch(batch)
        labels, mask = batch["labels"], batch["decoder_attention_mask"]
        key = jax.random.fold_in(state.rng, state.step)
        rows = _global_rows(labels.shape[0], axis_name)

        def summed_loss(trainable):
            logits = _forward_train(apply_fn, merge_fn(trainable, frozen), batch, key, rows,
                                    per_example_dropout)
            return token_loss_sum(logits, labels, mask)

        (total, count), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params)
        if axis_name is not None:
            total, count, grads = jax.lax.psum((total, count, grads), axis_name)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: (g / denom).astype(g.dtype), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = total / denom, optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "finite": jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_norm)
                                      ).astype(jnp.float32),
        }
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(apply_fn: ApplyFn, *, merge_fn: MergeFn) -> Callable[..., dict]:
    """Returns `eval_step(params, frozen, batch, axis_name=None) -> sums` (deterministic).

    `batch` may hold `example_mask` [B] (1 = real example, 0 = padding row added to fill the
    last batch); padded rows contribute nothing. Returns float32 scalars `loss_sum`, `tokens`,
    `examples` summed over the (global) batch: accumulate them over batches and report
    `loss_sum / tokens`.
    """

    def eval_step(params: Any, frozen: Any, batch: Batch,
                  axis_name: str | None = None) -> dict:
        check_batch(batch)
        labels, mask = batch["labels"], batch["decoder_attention_mask"]
        examples = batch.get("example_mask")
        if examples is None:
            examples = jnp.ones(labels.shape[:1], jnp.float32)
        examples = examples.astype(jnp.float32)
        logits = apply_fn(merge_fn(params, frozen), batch, True, None)
        total, count = token_loss_sum(logits, labels, mask * examples[:, None])
        sums = {"loss_sum": total, "tokens": count, "examples": jnp.sum(examples)}
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def raise_if_nonfinite(history: list[tuple[int, Mapping[str, Any]]]) -> None:
    """Host check of `(step, metrics)` records: raises `NonFiniteLossError` at the first
    record whose `finite` flag is 0. Metrics may still be device arrays (this syncs)."""
    for step, metrics in history:
        if float(np.asarray(metrics["finite"])) < 0.5:
            raise NonFiniteLossError(step, float(np.asarray(metrics["loss"])),
                                     float(np.asarray(metrics["grad_norm"])))
