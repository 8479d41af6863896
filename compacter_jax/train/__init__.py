"""Generic training machinery: optimizer, train state, pure steps, parallel strategies,
orbax checkpoints and loop building blocks (see docs/DESIGN.md). Knows nothing of PEFT
methods or data: it takes `merge_fn` and opaque data positions."""

from compacter_jax.train.checkpoint import Checkpointer
from compacter_jax.train.loop import MetricsBuffer, due, evaluate_loss, mean_metrics
from compacter_jax.train.optim import make_optimizer, make_schedule
from compacter_jax.train.parallel import (
    JitStrategy, PmapStrategy, Strategy, init_distributed, make_strategy)
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import (
    PACKING_KEYS, NonFiniteLossError, loss_fn, make_eval_step, make_train_step,
    raise_if_nonfinite, seq2seq_apply_fn, token_loss_sum)

__all__ = [
    "Checkpointer", "JitStrategy", "MetricsBuffer", "NonFiniteLossError", "PACKING_KEYS",
    "PmapStrategy", "Strategy", "TrainState", "due", "evaluate_loss", "init_distributed",
    "loss_fn", "make_eval_step", "make_optimizer", "make_schedule", "make_strategy",
    "make_train_step", "mean_metrics", "raise_if_nonfinite", "seq2seq_apply_fn",
    "token_loss_sum",
]
