"""Differentially private train step (DP-SGD / DP-Adam, Abadi et al. 2016; for PEFT: Yu et al.
2021) over the trainable subtree, for any `merge_fn` (so for every PEFT method).

One update:
  1. every row of the (padded) batch is one example; `example_mask` [B] marks the sampled ones
     (padding rows count for nothing: their clipped gradient is zeroed);
  2. per example, the gradient of its own token-mean cross-entropy with respect to the
     *trainable* tree only (the frozen backbone is an argument, never differentiated), with
     its own dropout key `fold_in(fold_in(rng, step), global_row)` (as `make_train_step`'s
     `per_example_dropout`, so pmap, jit and any device count draw the same masks);
  3. each per-example gradient is clipped to global L2 norm `clip_norm`, they are summed,
     Gaussian noise of std `noise_multiplier * clip_norm` is added once to the sum, and the
     result is divided by the *expected* batch size (q * N, a constant, so the sensitivity
     stays `clip_norm / expected_batch_size`), then handed to the optimizer (post-processing).

Steps 2-3 (vmap of the per-example gradient, clipping, masked sum) are jax-privacy's
`clipped_grad` (DeepMind's library: it differentiates one argument, here the trainable tree,
vmaps over the batch arguments, here the examples and their dropout keys, and zeroes padding
rows through `is_padding_example`). The Gaussian noise is one line, added here rather than
through jax-privacy's noise_addition (stateful optax privatizers meant to wrap the optimizer)
so that under pmap it comes after the cross-device `psum`, with the same key on every device:
it is drawn once for the global batch. Under
the jit strategy the batch rows are sharded over the mesh's "data" axis and the vmap over
examples is partitioned with them (per-example work stays on the device holding the example);
the sum over examples becomes XLA's all-reduce. `microbatch_size` bounds memory: jax-privacy then
runs the vmap over chunks of that many examples sequentially.

Sampling: the accountant (`compacter_jax.train.privacy`) assumes Poisson sampling (each example
in each step independently with probability q). `poisson_sample` draws it on the host from
(seed, step) (the same on every host, resumable), and `padded_rows` picks a static row count
that holds the sample except with negligible probability; a larger sample is never truncated
(that would change the mechanism): it is padded to a bigger shape and that step recompiles.

Per-example losses are token means (each example weighs the same, whatever its length); with
noise 0, clip inf and examples of equal target length this is `make_train_step`'s update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax_privacy.clipping import clipped_grad

from compacter_jax.train.state import TrainState
from compacter_jax.train.step import ApplyFn, Batch, MergeFn, _global_rows, token_loss_sum

# Batch keys that describe rows rather than feed the model.
ROW_KEYS = ("example_mask", "example_index")


def make_dp_train_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    merge_fn: MergeFn,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    schedule: optax.Schedule | None = None,
    microbatch_size: int | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Returns `train_step(state, frozen, batch, axis_name=None) -> (state, metrics)`, a
    drop-in for `make_train_step`'s (same strategies, same state).

    Args:
      apply_fn, tx, merge_fn, schedule: as `make_train_step`.
      clip_norm: per-example L2 bound C (> 0; inf only with noise_multiplier 0).
      noise_multiplier: sigma >= 0; the noise std is sigma * C.
      expected_batch_size: q * N, the divisor of the noised sum (> 0).
      microbatch_size: None, or examples per sequential vmap chunk (memory bound).
    `batch` may hold `example_mask` [B] (1 = sampled example, 0 = padding row; default all 1).
    Metrics (float32 scalars): loss (token mean over the sampled examples), tokens, examples
    (number sampled), clipped_fraction (of sampled examples whose gradient norm exceeded C),
    grad_norm (of the noised update), finite, learning_rate (when `schedule` is given).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got "
                         f"{noise_multiplier}")
    if noise_multiplier > 0 and not math.isfinite(clip_norm):
        raise ValueError("noise_multiplier > 0 needs a finite clip_norm (the noise std is "
                         "noise_multiplier * clip_norm)")
    if not expected_batch_size > 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    noise_std = noise_multiplier * clip_norm if noise_multiplier > 0 else 0.0

    def example_loss(trainable, frozen, example, key):
        single = jax.tree_util.tree_map(lambda x: x[None], example)
        logits = apply_fn(merge_fn(trainable, frozen), single, False, {"dropout": key})
        total, count = token_loss_sum(logits, single["labels"], single["decoder_attention_mask"])
        return total / jnp.maximum(count, 1.0), (total, count)

    grad_fn = clipped_grad(example_loss, argnums=0, has_aux=True, l2_clip_norm=clip_norm,
                           batch_argnums=(2, 3), keep_batch_dim=False, return_grad_norms=True,
                           microbatch_size=microbatch_size, dtype=jnp.float32)

    def train_step(state: TrainState, frozen: Any, batch: Batch,
                   axis_name: str | None = None) -> tuple[TrainState, dict]:
        labels = batch["labels"]
        rows = labels.shape[0]
        mask = batch.get("example_mask")
        mask = jnp.ones((rows,), jnp.float32) if mask is None else mask.astype(jnp.float32)
        key = jax.random.fold_in(state.rng, state.step)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, _global_rows(rows, axis_name))
        examples = {k: v for k, v in batch.items() if k not in ROW_KEYS}
        grad_sum, aux = grad_fn(state.params, frozen, examples, keys,
                                is_padding_example=mask == 0)
        totals, counts = aux.aux
        sums = {"loss_sum": jnp.sum(totals * mask), "tokens": jnp.sum(counts * mask),
                "examples": jnp.sum(mask),
                "clipped": jnp.sum((aux.grad_norms > clip_norm) * mask)}
        if axis_name is not None:
            grad_sum, sums = jax.lax.psum((grad_sum, sums), axis_name)
        if noise_std > 0:  # drawn from the global sum: the same on every device
            noise_key = jax.random.fold_in(jax.random.split(state.rng)[1], state.step)
            leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
            leaf_keys = jax.random.split(noise_key, len(leaves))
            leaves = [g + noise_std * jax.random.normal(k, g.shape, g.dtype)
                      for g, k in zip(leaves, leaf_keys)]
            grad_sum = jax.tree_util.tree_unflatten(treedef, leaves)
        grads = jax.tree_util.tree_map(
            lambda g, p: (g / expected_batch_size).astype(p.dtype), grad_sum, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss = sums["loss_sum"] / jnp.maximum(sums["tokens"], 1.0)
        grad_norm = optax.tree.norm(grads)
        # jax-privacy zeroes NaN/inf per-example gradients (its guarantee holds with them), so
        # divergence shows in the losses: they are checked as the non-DP step's.
        finite = jnp.logical_and(jnp.all(jnp.isfinite(totals)), jnp.isfinite(grad_norm))
        metrics = {"loss": loss, "tokens": sums["tokens"], "examples": sums["examples"],
                   "clipped_fraction": sums["clipped"] / jnp.maximum(sums["examples"], 1.0),
                   "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def poisson_sample(num_examples: int, sampling_rate: float, seed: int, step: int
                   ) -> np.ndarray:
    """Rows of step `step`'s Poisson sample: each of `num_examples` rows independently with
    probability `sampling_rate`; a pure function of (seed, step). Returns sorted int64 [n]."""
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    rng = np.random.default_rng([seed, step, 0x5044])  # own stream, apart from data order
    return np.flatnonzero(rng.random(num_examples) < sampling_rate)


def padded_rows(num_examples: int, sampling_rate: float, multiple_of: int = 1,
                overflow_probability: float = 1e-4) -> int:
    """A static row count that holds a Poisson sample (Binomial(N, q) rows) except with
    probability <= `overflow_probability`, rounded up to `multiple_of` (the devices). Padding
    rows cost compute; the rare larger sample costs one compilation (`pad_rows`). Expected
    batch 100 of SST-2's 66k: 140 rows."""
    from scipy import stats  # noqa: PLC0415 (only hosts that sample need it)
    rows = int(stats.binom.isf(overflow_probability, num_examples, sampling_rate)) + 1
    rows = max(1, min(rows, num_examples))
    return -(-rows // multiple_of) * multiple_of


def pad_rows(num_sampled: int, rows: int, multiple_of: int = 1) -> int:
    """The row count of a step with `num_sampled` examples: `rows`, or more (rounded up to
    `multiple_of`) in the rare step whose sample is larger; never truncated."""
    return max(rows, -(-num_sampled // multiple_of) * multiple_of)
