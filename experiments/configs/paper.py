"""One run of the paper's recipe: `--config experiments/configs/paper.py:TASK,METHOD`.

The paper's recipe (§5; t5-base v1.0, source length 128, AdamW, 500 warm-up steps then linear
decay, clipping 1.0, seed 42, batch 100, 20 epochs on small tasks and 3 on large ones, the
method's learning rate, evaluation every epoch, test at the best validation checkpoint) is
`glue.py:paper` with the task and method set and no fallback backbone. Data only: the paper's
grid, titles and scores live in `experiments/paper.py`; `python -m experiments.paper_runs
--sweep` prints (or runs) the whole grid. The task name is checked with the rest of the config
when the run starts (`--config.task`), before anything loads.
"""

from __future__ import annotations

import ml_collections

from compacter_jax import peft
from experiments.configs import glue


def get_config(spec: str = "rte,compacter++") -> ml_collections.ConfigDict:
    try:
        task, method = (part.strip() for part in spec.split(","))
    except ValueError:
        raise ValueError(f"paper.py takes 'TASK,METHOD' (e.g. paper.py:rte,compacter), "
                         f"got {spec!r}") from None
    peft.get_method(method)  # an unknown name fails here, listing the registered ones
    c = glue.get_config("paper")
    c.task = task
    c.method = method
    c.fallback_model = ""  # the paper's numbers need the pretrained t5-base: never fall back
    return c
