"""The paper's runs, one config per (task, method): `--config experiments/configs/paper.py:rte,compacter`.

Everything follows the paper's recipe (§5; t5-base v1.0, source length 128, AdamW, 500 warm-up
steps then linear decay, clipping 1.0, seed 42, batch 100, 20 epochs on small tasks and 3 on
large ones, the method's learning rate, evaluation every epoch, test at the best validation
checkpoint). `experiments/paper_runs.py` prints the whole grid.
"""

from __future__ import annotations

from experiments.configs import glue

# Paper Table 1 (GLUE) and Table 2 (SuperGLUE) tasks, and the methods compared there.
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
SUPERGLUE_TASKS = ("boolq", "cb", "copa", "multirc", "record", "wic")
METHODS = ("full", "adapter", "pfeiffer", "adapterdrop", "lowrank", "phm_adapter", "compacter",
           "compacter++", "bitfit", "prompt_tuning")


def get_config(spec: str = "rte,compacter++"):
    try:
        task, method = (part.strip() for part in spec.split(","))
    except ValueError:
        raise ValueError(f"paper.py takes 'TASK,METHOD' (e.g. paper.py:rte,compacter), "
                         f"got {spec!r}") from None
    c = glue.get_config("paper")
    c.task = task
    c.method = method
    c.fallback_model = ""  # the paper's numbers need the pretrained t5-base: never fall back
    return c
