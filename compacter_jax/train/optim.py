"""Optimizer of the paper's recipe (paper §5): global-norm clipping + AdamW with a linear
warm-up then linear decay of the learning rate.

Two AdamWs, picked by name in `make_optimizer(optimizer=...)`:

* "adamw": `optax.adamw` (textbook Adam: eps added to the bias-corrected sqrt(v)).
* "hf_adamw": transformers' own `AdamW`, the one the original's HF Trainer (transformers 4.x)
  builds, with torch's `clip_grad_norm_` in front: eps is added to the *uncorrected* sqrt(v)
  and the bias correction goes into the step size. The two differ when |g| is not >> eps,
  as with Compacter's 1e-4-scale shared rule (COMPACTER_SPEC.md §5).

The optimizer is built for, and applied to, the *trainable* parameter tree only (see
`compacter_jax.peft.partition`); the frozen backbone never gets gradients or Adam moments.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adamw", "hf_adamw")


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """HF `get_linear_schedule_with_warmup`: linear 0 -> `learning_rate` over `warmup_steps`
    updates, then linear -> 0 at `total_steps`; when warmup_steps >= total_steps the rate
    simply ramps for the whole run (the normal case for short runs such as RTE's 20 epochs).

    The schedule is evaluated at the number of updates already applied (optax's count), so the
    first update uses lr(0) (= 0 when warming up), as HF's. Returns a function
    `step (int32 scalar) -> learning rate (float32 scalar)`.
    """
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    if warmup_steps >= total_steps:  # HF: still ramping at total_steps, 0 from warmup_steps on
        return optax.join_schedules([warmup, optax.constant_schedule(0.0)], [warmup_steps])
    decay = optax.linear_schedule(learning_rate, 0.0, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def _one_minus_power(beta: float, t: jax.Array) -> jax.Array:
    """1 - beta**t in float32 without cancellation: -expm1(t * ln(beta)) with ln(beta) taken in
    float64 (1 - 0.999f**1 is off by 1.3e-5 relative; this is within a few ulps)."""
    if beta == 0.0:
        return jnp.ones([], jnp.float32)
    return -jnp.expm1(t.astype(jnp.float32) * jnp.float32(math.log(beta)))


def scale_by_hf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                     ) -> optax.GradientTransformation:
    """The direction of transformers' `AdamW` (before the learning rate): at update t (1-based)

        m_t = b1 m_{t-1} + (1 - b1) g_t
        v_t = b2 v_{t-1} + (1 - b2) g_t^2
        d_t = sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)

    i.e. eps is added to the uncorrected sqrt(v_t). Textbook Adam (`optax.scale_by_adam`)
    computes m_hat / (sqrt(v_hat) + eps) = sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) +
    eps*sqrt(1-b2^t)): its eps is smaller by sqrt(1-b2^t) (0.03 at t=1, 0.3 at t=100).

    The state is `optax.ScaleByAdamState` (count, mu, nu), the same tree as optax's Adam.
    Returns a GradientTransformation; updates keep the dtype of the gradients.
    """
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be in [0, 1), got b1={b1}, b2={b2}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")

    def init_fn(params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree_util.tree_map(zeros, params),
                                      nu=jax.tree_util.tree_map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree_utils.tree_update_moment(updates, state.mu, b1, 1)
        nu = optax.tree_utils.tree_update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        step_size = jnp.sqrt(_one_minus_power(b2, count)) / _one_minus_power(b1, count)
        new = jax.tree_util.tree_map(
            lambda m, v, g: (step_size * m / (jnp.sqrt(v) + eps)).astype(g.dtype),
            mu, nu, updates)
        return new, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def hf_decoupled_weight_decay(weight_decay: float, learning_rate: optax.ScalarOrSchedule
                              ) -> optax.GradientTransformation:
    """transformers' `AdamW` weight decay, placed after the (already lr-scaled) Adam update u:
    HF first applies p' = p + u, then p'' = p' - lr * wd * p', so the final update is
    u - lr * wd * (p + u). (`optax.add_decayed_weights` decays the old p: u - lr * wd * p;
    the two differ by lr^2 * wd * d.) Needs `params`; keeps its own step count for the
    schedule.
    """
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("hf_decoupled_weight_decay needs params: call tx.update(grads, "
                             "state, params)")
        decay = schedule(state.count) * weight_decay
        new = jax.tree_util.tree_map(
            lambda u, p: (u - decay * (p + u)).astype(u.dtype), updates, params)
        return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """torch `clip_grad_norm_` (what the HF Trainer calls): g *= max_norm / (||g|| + 1e-6)
    when that factor is < 1. (`optax.clip_by_global_norm` scales by max_norm / ||g||.)"""

    def update_fn(updates, state, params=None):
        del params
        coef = max_norm / (optax.tree_utils.tree_norm(updates) + 1e-6)
        scale = jnp.minimum(coef, 1.0)
        return jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def hf_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """transformers' `AdamW` (4.x, `correct_bias=True`) as an optax chain: per update t,

        p <- p - lr_t * sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps)
        p <- p - lr_t * wd * p            (on the p just updated; skipped when wd == 0)

    with lr_t = learning_rate(t - 1) (the schedule at the updates already applied, as the
    Trainer's `optimizer.step(); scheduler.step()`). Decay applies to every leaf it is given
    (the HF Trainer exempts biases and nn.LayerNorm weights; with the paper's wd = 0 the
    difference is moot).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    parts = [scale_by_hf_adam(b1, b2, eps), optax.scale_by_learning_rate(learning_rate)]
    if weight_decay > 0:
        parts.append(hf_decoupled_weight_decay(weight_decay, learning_rate))
    return optax.chain(*parts)


def make_optimizer(
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    optimizer: str = "adamw",
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns `(tx, schedule)`: clipping to `clip_norm` -> AdamW(schedule).

    `optimizer`: "adamw" (optax.clip_by_global_norm + optax.adamw) or "hf_adamw" (torch's
    clip_grad_norm_ + transformers' AdamW, the original's; see `hf_adamw`). `clip_norm=None`
    (or <= 0) disables clipping. `schedule(step)` gives the learning rate applied at update
    `step` (0-based), for logging. Weight decay is decoupled (AdamW) and applies to every
    trainable leaf (the paper uses 0).

    Raises ValueError for an unknown `optimizer`, naming the known ones.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not known; use one of {OPTIMIZERS} "
                         "('hf_adamw': transformers' AdamW, the original's)")
    schedule = make_schedule(learning_rate, warmup_steps, total_steps)
    clip = clip_norm is not None and clip_norm > 0
    if optimizer == "hf_adamw":
        adam = hf_adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        return (optax.chain(clip_by_global_norm_torch(clip_norm), adam) if clip else adam,
                schedule)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return (optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip else adamw,
            schedule)

