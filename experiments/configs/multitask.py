"""Multi-task config for `python -m experiments.multitask`: one adapter per task, trained in
one job on one frozen backbone.

Every field of `experiments/configs/glue.py` applies to each task (`--config.batch_size` is the
number of examples *of each task* in every step; epochs, `max_steps`, evaluation and the
learning rate are per task as in a single-task run). `--config.tasks=rte,mrpc,cola` lists the
tasks (the job has no single `task` field: `--config.task` is refused).
`--config experiments/configs/multitask.py:paper` uses the paper's recipe for every task.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import glue


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    c = glue.get_config(variant)
    c.tasks = "rte,mrpc,cola"  # comma-separated registry names (see docs/tasks.md)
    del c.task  # the job's tasks are `tasks`
    return c
