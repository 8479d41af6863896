"""Generic training machinery: optimizer, train state, pure steps, parallel strategies,
orbax checkpoints and a resumable host loop (see docs/DESIGN.md)."""

from compacter_jax.train.checkpoint import Checkpointer, export_trainable, load_trainable
from compacter_jax.train.loop import LoopResult, evaluate_loss, train_loop
from compacter_jax.train.optim import make_optimizer, make_schedule
from compacter_jax.train.parallel import (
    JitStrategy, PmapStrategy, Strategy, init_distributed, make_strategy)
from compacter_jax.train.state import TrainState
from compacter_jax.train.step import (
    NonFiniteLossError, loss_fn, make_eval_step, make_train_step, raise_if_nonfinite,
    seq2seq_apply_fn, token_loss_sum)

__all__ = [
    "Checkpointer", "JitStrategy", "LoopResult", "NonFiniteLossError",
    "PmapStrategy", "Strategy", "TrainState", "evaluate_loss", "export_trainable",
    "init_distributed", "load_trainable", "loss_fn", "make_eval_step", "make_optimizer",
    "make_schedule", "make_strategy", "make_train_step", "raise_if_nonfinite", "seq2seq_apply_fn",
    "token_loss_sum", "train_loop",
]
