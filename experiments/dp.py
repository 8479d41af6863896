"""Differentially private fine-tuning in `experiments.finetune`: the `--config.dp.*` fields
turned into a plan (noise, sampling rate, delta), the Poisson-sampled padded batches, the train
step and the (epsilon, delta) spent, for any PEFT method (only its trainable tree is clipped
and noised: `compacter_jax.train.dp`).

    --config.dp.epsilon=8              # target: noise calibrated so the run spends <= 8
    --config.dp.noise_multiplier=1.0   # or the noise itself; epsilon is then reported
    --config.dp.clip_norm=1.0 --config.dp.delta=1e-5 --config.dp.accountant=rdp|pld

Sampling rate q = batch_size / training rows (batch_size is the *expected* batch); steps are
`max_steps` / epochs as without DP. The accountant assumes Poisson sampling, so the batches are
drawn that way (not the shuffled epochs of non-DP runs); a step's batch is a pure function of
(seed, step), so a resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from compacter_jax import data as data_lib

# compacter_jax.train.dp / .privacy (jax-privacy, dp-accounting) are imported where used: a
# run without DP does not pay for them.

log = logging.getLogger(__name__)


# Fields that fix a DP run's mechanism besides `dp.*` (which `experiments.workdir` never lets
# a resume change): the sampling rate, the number of steps the noise was calibrated for, the
# sample of every step.
MECHANISM_FIELDS = ("batch_size", "max_steps", "epochs", "train_samples", "seed", "data_seed")


def refuse_changed_mechanism(changes: dict[str, Any]) -> None:
    """Raises ValueError when a DP run would resume with a field of `MECHANISM_FIELDS`
    changed (`--config.allow_config_change` or not): the (epsilon, delta) accounting assumes
    one noise multiplier and sampling rate over the whole run."""
    bad = sorted(k for k in changes if k.split(".")[0] in MECHANISM_FIELDS)
    if bad:
        raise ValueError(
            f"a differentially private run cannot resume with changed {', '.join(bad)}: its "
            "noise, sampling rate and accounting are fixed by the configuration it started "
            "with; restore those values or start a new --workdir")


@dataclasses.dataclass(frozen=True)
class DPPlan:
    """The mechanism of a DP run (see `compacter_jax.train.privacy`)."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    sampling_rate: float
    steps: int
    accountant: str
    target_epsilon: float | None
    num_examples: int
    expected_batch_size: int
    rows: int  # static rows of a padded batch (a multiple of `multiple_of`)
    microbatch_size: int | None
    multiple_of: int  # devices (x microbatch_size: each device's rows split into chunks)

    def spent(self, step: int) -> dict[str, float]:
        """(epsilon, delta) spent after `step` updates."""
        from compacter_jax.train import privacy  # noqa: PLC0415
        return {"epsilon": privacy.epsilon(self.noise_multiplier, self.sampling_rate, step,
                                           self.delta, self.accountant),
                "delta": self.delta}

    def summary(self, step: int) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **self.spent(step), "sampling": "poisson",
                "steps_accounted": step}


def make_plan(config, num_examples: int, total_steps: int, multiple_of: int) -> DPPlan:
    """The run's DP mechanism; the noise is calibrated when a target epsilon is given.
    `multiple_of`: the devices the batch is split over (padded rows are a multiple of them,
    times `dp.microbatch_size` when set).

    Raises:
      ValueError naming `--config.dp.<field>` when delta is not below 1 / N.
    """
    from compacter_jax.train import dp as dp_lib  # noqa: PLC0415
    from compacter_jax.train import privacy  # noqa: PLC0415
    dp = config.dp
    delta = dp.delta if dp.delta is not None else 1.0 / num_examples ** 1.1
    if delta >= 1.0 / num_examples:
        raise ValueError(f"--config.dp.delta={delta}: must be below 1 / {num_examples} (the "
                         "training examples), else a mechanism may publish one example "
                         "outright; e.g. 1e-5 or leave it unset")
    rate = config.batch_size / num_examples
    microbatch = dp.microbatch_size if dp.microbatch_size > 0 else None
    multiple_of *= microbatch or 1
    if dp.epsilon is not None:
        sigma = privacy.calibrate_noise_multiplier(dp.epsilon, rate, total_steps, delta,
                                                   dp.accountant)
        log.info("DP: noise multiplier %.4f calibrated for epsilon <= %g at delta %.3g over "
                 "%d steps (q = %.5f, %s accountant)", sigma, dp.epsilon, delta, total_steps,
                 rate, dp.accountant)
    else:
        sigma = float(dp.noise_multiplier)
    return DPPlan(noise_multiplier=sigma, clip_norm=float(dp.clip_norm), delta=float(delta),
                  sampling_rate=rate, steps=total_steps, accountant=dp.accountant,
                  target_epsilon=dp.epsilon, num_examples=num_examples,
                  expected_batch_size=config.batch_size,
                  rows=dp_lib.padded_rows(num_examples, rate, multiple_of),
                  microbatch_size=microbatch, multiple_of=multiple_of)


def make_train_step(plan: DPPlan, apply_fn, tx, *, merge_fn, schedule):
    """`compacter_jax.train.dp.make_dp_train_step` with the plan's mechanism."""
    from compacter_jax.train import dp as dp_lib  # noqa: PLC0415
    return dp_lib.make_dp_train_step(
        apply_fn, tx, merge_fn=merge_fn, clip_norm=plan.clip_norm,
        noise_multiplier=plan.noise_multiplier, expected_batch_size=plan.expected_batch_size,
        schedule=schedule, microbatch_size=plan.microbatch_size)


def train_batches(config, encoded: data_lib.EncodedData, position: data_lib.DataState,
                  start_step: int, plan: DPPlan) -> Iterator[tuple]:
    """(position, this host's rows, global token fill) for steps start_step + 1, ...: step
    s's Poisson sample, padded with empty rows (`example_mask` 0) to `plan.rows` rows (more,
    never fewer examples, in the rare step whose sample is larger). `position` is passed
    through unchanged (the batches depend on the step alone)."""
    from compacter_jax.train import dp as dp_lib  # noqa: PLC0415
    step = start_step
    while True:
        step += 1
        idx = dp_lib.poisson_sample(len(encoded), plan.sampling_rate, config.seed, step)
        rows = dp_lib.pad_rows(len(idx), plan.rows, plan.multiple_of)
        if rows > plan.rows:
            log.warning("DP step %d: %d examples sampled, more than the %d padded rows; this "
                        "step uses %d rows (a new compilation)", step, len(idx), plan.rows, rows)
        batch = data_lib.pad_batch(data_lib.make_batch(encoded, idx), rows,
                                   source_multiple=config.get("source_bucket", 0))
        batch["example_mask"] = (np.arange(rows) < len(idx)).astype(np.int32)
        mine = data_lib.shard_for_host(batch, jax.process_index(), jax.process_count())
        yield position, mine, data_lib.fill(batch)
