"""Optimizer of the paper's recipe (paper §5): global-norm clipping + AdamW with a linear
warm-up then linear decay of the learning rate.

The optimizer is built for, and applied to, the *trainable* parameter tree only (see
`compacter_jax.peft.partition`); the frozen backbone never gets gradients or Adam moments.
"""

from __future__ import annotations

import optax


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


def make_optimizer(
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns `(tx, schedule)`: clip_by_global_norm(clip_norm) -> AdamW(schedule).

    `clip_norm=None` (or <= 0) disables clipping. `schedule(step)` gives the learning rate
    applied at update `step` (0-based), for logging. Weight decay is decoupled (AdamW) and
    applies to every trainable leaf (the paper uses 0).
    """
    schedule = make_schedule(learning_rate, warmup_steps, total_steps)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if clip_norm is None or clip_norm <= 0:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw), schedule
