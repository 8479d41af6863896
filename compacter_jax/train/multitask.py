"""Joint training of K task-specific trainable trees (an adapter bank) on one frozen backbone.

The trainable state is a *bank*: the trainable tree with a leading task axis K on every leaf.
A joint batch holds examples of every task, each row marked by `task_ids` [B] (0..K-1, -1 for
an empty packed row); `bank_apply(bank, frozen, batch, deterministic, rngs)` computes every
row with its task's slice (`compacter_jax.peft.bank.make_bank_apply`). Nothing here knows what
a method or a task is: the step takes that function, like `make_train_step` takes `apply_fn`
and `merge_fn`.

One joint step is K single-task steps at once. Task k has its own

* loss normalisation: its token cross-entropy summed over its rows divided by its own token
  count (the single-task loss); the joint loss is the sum over tasks;
* gradient: slice k of the bank only touches rows of task k, so d(joint loss)/d(slice k) is
  task k's own gradient;
* optimizer `txs[k]` and state (clipping by the global norm of slice k, its Adam moments, its
  schedule with its own total steps);
* length `total_steps[k]`: from update `total_steps[k]` on, task k is finished: its slice and
  its optimizer state are left exactly as they are (Adam would move them even with zero
  gradients) and it adds nothing to the loss (its rows may be empty padding).

So with each task's batch equal to a single-task run's batch, dropout off and the same data
order, slice k after N joint steps equals the single-task run after min(N, total_steps[k])
steps (up to float summation order: <= 1e-5 in the tests).

Dropout: every example draws its own mask (`bank_apply` folds the row's index in the global
batch into the step's key: one device, jit and pmap draw the same masks), so dropout-on runs
do not reproduce single-task runs mask for mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from compacter_jax.train.state import TrainState, as_raw_key

BankApplyFn = Callable[[Any, Any, Mapping[str, jax.Array], bool, "dict | None"], jax.Array]
TASK_IDS = "task_ids"


def slice_tree(bank: Any, k: int) -> Any:
    """Slice k of every leaf of a bank (leading task axis)."""
    return jax.tree_util.tree_map(lambda x: x[k], bank)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def init_multitask_state(bank: Any, txs: Sequence[optax.GradientTransformation],
                         rng: jax.Array | int) -> TrainState:
    """A fresh `TrainState` at step 0: `params` = the bank, `opt_state` = a tuple with
    `txs[k].init(slice k)` for each task (each task's own optimizer state)."""
    size = len(jax.tree_util.tree_leaves(bank)[0])
    if len(txs) != size:
        raise ValueError(f"{len(txs)} optimizers for a bank of {size} tasks; give one per task")
    return TrainState(step=jnp.zeros((), jnp.int32), params=bank,
                      opt_state=tuple(tx.init(slice_tree(bank, k)) for k, tx in enumerate(txs)),
                      rng=as_raw_key(rng))


def _per_task_sums(logits, labels, mask, task_ids, num_tasks):
    """(loss sums [K], token counts [K]) of the rows of each task (rows of id -1: none)."""
    onehot = (task_ids[:, None] == jnp.arange(num_tasks)[None, :]).astype(jnp.float32)
    row_mask = mask.astype(jnp.float32)
    # The per-token losses of `step.token_loss_sum`, summed per row, then per task.
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels.astype(jnp.int32)) * row_mask
    return onehot.T @ losses.sum(axis=1), onehot.T @ row_mask.sum(axis=1)


def make_multitask_train_step(
    bank_apply: BankApplyFn,
    txs: Sequence[optax.GradientTransformation],
    *,
    total_steps: Sequence[int],
    names: Sequence[str] | None = None,
    schedules: Sequence[optax.Schedule] | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Returns `train_step(state, frozen, batch, axis_name=None) -> (state, metrics)`.

    Args:
      bank_apply: `(bank, frozen, batch, deterministic, rngs, row_offset) -> logits [B, T, V]`, each row
        computed with the slice `batch["task_ids"][row]` of the bank.
      txs: one optimizer per task (e.g. `make_optimizer(lr, warmup, total_steps[k])[0]`).
      total_steps: updates of each task; task k is not updated from step total_steps[k] on.
      names: labels of the tasks in the metrics (default "0", "1", ...).
      schedules: per task, for the `{name}/learning_rate` metric.
    Returns:
      The step. `state` comes from `init_multitask_state`; `batch` is the DESIGN.md batch
      plus `task_ids` [B]. Metrics (float32 scalars): per task `{name}/loss` (its token
      mean), `{name}/tokens`, `{name}/grad_norm` (before clipping), `{name}/active` (1 while
      it trains) and `{name}/learning_rate`; `loss` (sum over active tasks), `tokens`, and
      `finite` (1.0 if every active task's loss and gradient norm are finite).
    """
    num_tasks = len(txs)
    if len(total_steps) != num_tasks:
        raise ValueError(f"{len(total_steps)} total_steps for {num_tasks} optimizers")
    if any(int(t) < 1 for t in total_steps):
        raise ValueError(f"total_steps must all be >= 1, got {list(total_steps)}")
    names = [str(k) for k in range(num_tasks)] if names is None else list(names)
    if len(names) != num_tasks or len(set(names)) != num_tasks:
        raise ValueError(f"names must be {num_tasks} distinct labels, got {names}")
    if schedules is not None and len(schedules) != num_tasks:
        raise ValueError(f"{len(schedules)} schedules for {num_tasks} tasks")
    totals = jnp.asarray([int(t) for t in total_steps], jnp.int32)

    def train_step(state: TrainState, frozen: Any, batch: Mapping[str, jax.Array],
                   axis_name: str | None = None) -> tuple[TrainState, dict]:
        if TASK_IDS not in batch:
            raise ValueError("a multi-task batch needs 'task_ids' [B] (the task of each row)")
        labels, mask, task_ids = batch["labels"], batch["decoder_attention_mask"], batch[TASK_IDS]
        key = jax.random.fold_in(state.rng, state.step)
        # Dropout keys follow the row's index in the global batch (not the device), so pmap
        # draws the masks of one device and of jit.
        row_offset = (0 if axis_name is None
                      else jax.lax.axis_index(axis_name) * task_ids.shape[0])

        def summed_loss(bank):
            logits = bank_apply(bank, frozen, batch, False, {"dropout": key}, row_offset)
            sums, counts = _per_task_sums(logits, labels, mask, task_ids, num_tasks)
            # Slices are independent: d(sum of all)/d(slice k) = d(task k's sum)/d(slice k).
            return jnp.sum(sums), (sums, counts)

        (_, (sums, counts)), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params)
        if axis_name is not None:
            sums, counts, grads = jax.lax.psum((sums, counts, grads), axis_name)
        denoms = jnp.maximum(counts, 1.0)
        active = state.step < totals
        new_params, new_opt, metrics = [], [], {}
        for k, tx in enumerate(txs):
            params_k = slice_tree(state.params, k)
            grads_k = jax.tree_util.tree_map(lambda g: (g[k] / denoms[k]).astype(g.dtype), grads)
            updates, opt_k = tx.update(grads_k, state.opt_state[k], params_k)
            stepped = optax.apply_updates(params_k, updates)
            keep = lambda new, old: jnp.where(active[k], new, old)  # noqa: E731
            new_params.append(jax.tree_util.tree_map(keep, stepped, params_k))
            new_opt.append(jax.tree_util.tree_map(keep, opt_k, state.opt_state[k]))
            loss_k, norm_k = sums[k] / denoms[k], optax.tree.norm(grads_k)
            metrics.update({f"{names[k]}/loss": loss_k, f"{names[k]}/tokens": counts[k],
                            f"{names[k]}/grad_norm": norm_k,
                            f"{names[k]}/active": active[k].astype(jnp.float32)})
            if schedules is not None:
                metrics[f"{names[k]}/learning_rate"] = jnp.asarray(
                    schedules[k](jnp.minimum(state.step, totals[k])), jnp.float32)
        losses = jnp.stack([metrics[f"{n}/loss"] for n in names])
        norms = jnp.stack([metrics[f"{n}/grad_norm"] for n in names])
        finite = jnp.all(jnp.where(active, jnp.isfinite(losses) & jnp.isfinite(norms), True))
        metrics.update({"loss": jnp.sum(jnp.where(active, losses, 0.0)),
                        "tokens": jnp.sum(jnp.where(active, counts, 0.0)),
                        "finite": finite.astype(jnp.float32)})
        new_state = state.replace(step=state.step + 1, params=_stack(new_params),
                                  opt_state=tuple(new_opt))
        return new_state, metrics

    return train_step
