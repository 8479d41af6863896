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

Shared leaves (`shared`: the '/'-free path tuples of leaves kept single, e.g. multi-task
ATTEMPT's attention module): such a leaf has no task axis; every task's rows use it, its
gradient is the sum over the active tasks of each task's own (normalised) gradient, i.e. the
gradient of the joint loss, and its own optimizer `shared_tx` (one schedule over the whole
run, its own clipping) updates it while any task trains.

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


SharedPaths = frozenset  # of parameter path tuples (("encoder", "prompt", "up", "kernel"), ...)


def _names(keypath) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


def split_shared(bank: Any, shared: SharedPaths = frozenset()) -> tuple[Any, Any]:
    """(per-task part, shared part) of a bank: the same tree twice, each with None where the
    other part's leaves are (None is an empty subtree to jax and optax)."""
    per = jax.tree_util.tree_map_with_path(
        lambda p, x: None if _names(p) in shared else x, bank)
    one = jax.tree_util.tree_map_with_path(
        lambda p, x: x if _names(p) in shared else None, bank)
    return per, one


def join_shared(per_task: Any, shared_part: Any) -> Any:
    """The inverse of `split_shared`."""
    return jax.tree_util.tree_map(lambda a, b: b if a is None else a, per_task, shared_part,
                                  is_leaf=lambda x: x is None)


def slice_tree(bank: Any, k: int, shared: SharedPaths = frozenset()) -> Any:
    """Task k's tree of a bank: slice k of every leaf with a task axis, shared leaves as they
    are."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if _names(p) in shared else x[k], bank)


def _stack(trees: Sequence[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _bank_size(bank: Any, shared: SharedPaths) -> int:
    per = jax.tree_util.tree_leaves(split_shared(bank, shared)[0])
    if not per:
        raise ValueError("the bank has no per-task leaf (every leaf is shared)")
    return len(per[0])


def init_multitask_state(bank: Any, txs: Sequence[optax.GradientTransformation],
                         rng: jax.Array | int, *, shared: SharedPaths = frozenset(),
                         shared_tx: optax.GradientTransformation | None = None) -> TrainState:
    """A fresh `TrainState` at step 0: `params` = the bank, `opt_state` = a tuple with
    `txs[k].init(slice k)` for each task (each task's own optimizer state), followed, when
    `shared` names leaves, by `shared_tx.init(shared leaves)`."""
    size = _bank_size(bank, shared)
    if len(txs) != size:
        raise ValueError(f"{len(txs)} optimizers for a bank of {size} tasks; give one per task")
    if shared and shared_tx is None:
        raise ValueError("a bank with shared leaves needs shared_tx (their optimizer)")
    per, one = split_shared(bank, shared)
    opt_state = tuple(tx.init(slice_tree(per, k)) for k, tx in enumerate(txs))
    if shared:
        opt_state += (shared_tx.init(one),)
    return TrainState(step=jnp.zeros((), jnp.int32), params=bank, opt_state=opt_state,
                      rng=as_raw_key(rng))


def _per_task_sums(logits, labels, mask, task_ids, num_tasks):
    """(loss sums [K], token counts [K]) of the rows of each task (rows of id -1: none)."""
    onehot = (task_ids[:, None] == jnp.arange(num_tasks)[None, :]).astype(jnp.float32)
    row_mask = mask.astype(jnp.float32)
    # The per-token losses of `step.token_loss_sum`, summed per row, then per task.
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels.astype(jnp.int32)) * row_mask
    return onehot.T @ losses.sum(axis=1), onehot.T @ row_mask.sum(axis=1)


def _per_task_counts(mask, task_ids, num_tasks):
    """Token counts [K] of the rows of each task (no parameter involved)."""
    onehot = (task_ids[:, None] == jnp.arange(num_tasks)[None, :]).astype(jnp.float32)
    return onehot.T @ mask.astype(jnp.float32).sum(axis=1)


def _check_step_args(txs, total_steps, names, schedules, shared, shared_tx) -> list[str]:
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
    if shared and shared_tx is None:
        raise ValueError("a bank with shared leaves needs shared_tx (their optimizer)")
    return names


def make_multitask_train_step(
    bank_apply: BankApplyFn,
    txs: Sequence[optax.GradientTransformation],
    *,
    total_steps: Sequence[int],
    names: Sequence[str] | None = None,
    schedules: Sequence[optax.Schedule] | None = None,
    shared: SharedPaths = frozenset(),
    shared_tx: optax.GradientTransformation | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Returns `train_step(state, frozen, batch, axis_name=None) -> (state, metrics)`.

    Args:
      bank_apply: `(bank, frozen, batch, deterministic, rngs, row_offset) -> logits [B, T, V]`, each row
        computed with the slice `batch["task_ids"][row]` of the bank.
      txs: one optimizer per task (e.g. `make_optimizer(lr, warmup, total_steps[k])[0]`).
      total_steps: updates of each task; task k is not updated from step total_steps[k] on.
      names: labels of the tasks in the metrics (default "0", "1", ...).
      schedules: per task, for the `{name}/learning_rate` metric.
      shared: path tuples of the bank's leaves without a task axis (shared by every task).
      shared_tx: their optimizer (needed when `shared` is not empty).
    Returns:
      The step. `state` comes from `init_multitask_state`; `batch` is the DESIGN.md batch
      plus `task_ids` [B]. Metrics (float32 scalars): per task `{name}/loss` (its token
      mean), `{name}/tokens`, `{name}/grad_norm` (before clipping), `{name}/active` (1 while
      it trains) and `{name}/learning_rate`; `loss` (sum over active tasks), `tokens`, and
      `finite` (1.0 if every active task's loss and gradient norm are finite); with shared
      leaves also `shared/grad_norm`.
    """
    names = _check_step_args(txs, total_steps, names, schedules, shared, shared_tx)
    num_tasks = len(txs)
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
        counts = _per_task_counts(mask, task_ids, num_tasks)
        if axis_name is not None:
            counts = jax.lax.psum(counts, axis_name)
        denoms, active = jnp.maximum(counts, 1.0), state.step < totals

        def joint_loss(bank):
            logits = bank_apply(bank, frozen, batch, False, {"dropout": key}, row_offset)
            sums, _ = _per_task_sums(logits, labels, mask, task_ids, num_tasks)
            # The sum of the active tasks' own losses: d/d(slice k) is task k's gradient,
            # d/d(a shared leaf) the sum of every task's.
            return jnp.sum(jnp.where(active, sums / denoms, 0.0)), sums

        (_, sums), grads = jax.value_and_grad(joint_loss, has_aux=True)(state.params)
        if axis_name is not None:
            sums, grads = jax.lax.psum((sums, grads), axis_name)
        (params, one), (grads, one_grads) = (split_shared(state.params, shared),
                                             split_shared(grads, shared))
        new_params, new_opt, metrics = _update_tasks(
            txs, names, schedules, state, params, grads, sums / denoms, counts, active, totals)
        if shared:
            updates, opt = shared_tx.update(one_grads, state.opt_state[-1], one)
            keep = lambda new, old: jnp.where(jnp.any(active), new, old)  # noqa: E731
            one = jax.tree_util.tree_map(keep, optax.apply_updates(one, updates), one)
            new_opt.append(jax.tree_util.tree_map(keep, opt, state.opt_state[-1]))
            metrics["shared/grad_norm"] = optax.tree.norm(one_grads)
        new_state = state.replace(step=state.step + 1, opt_state=tuple(new_opt),
                                  params=join_shared(_stack(new_params), one))
        return new_state, metrics

    return train_step


def _update_tasks(txs, names, schedules, state, params, grads, losses, counts, active, totals):
    """Each task's update of its slice (left as it is once the task has finished) and the
    metrics; `params`, `grads` are the per-task part of the bank."""
    new_params, new_opt, metrics = [], [], {}
    for k, tx in enumerate(txs):
        params_k, grads_k = slice_tree(params, k), slice_tree(grads, k)
        updates, opt_k = tx.update(grads_k, state.opt_state[k], params_k)
        stepped = optax.apply_updates(params_k, updates)
        keep = lambda new, old: jnp.where(active[k], new, old)  # noqa: E731
        new_params.append(jax.tree_util.tree_map(keep, stepped, params_k))
        new_opt.append(jax.tree_util.tree_map(keep, opt_k, state.opt_state[k]))
        metrics.update({f"{names[k]}/loss": losses[k], f"{names[k]}/tokens": counts[k],
                        f"{names[k]}/grad_norm": optax.tree.norm(grads_k),
                        f"{names[k]}/active": active[k].astype(jnp.float32)})
        if schedules is not None:
            metrics[f"{names[k]}/learning_rate"] = jnp.asarray(
                schedules[k](jnp.minimum(state.step, totals[k])), jnp.float32)
    norms = jnp.stack([metrics[f"{n}/grad_norm"] for n in names])
    finite = jnp.all(jnp.where(active, jnp.isfinite(losses) & jnp.isfinite(norms), True))
    metrics.update({"loss": jnp.sum(jnp.where(active, losses, 0.0)),
                    "tokens": jnp.sum(jnp.where(active, counts, 0.0)),
                    "finite": finite.astype(jnp.float32)})
    return new_params, new_opt, metrics
