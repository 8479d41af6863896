"""The paper's grid, titles and reported numbers (Karimi Mahabadi et al. 2021, Tables 1-2, §5).

The recipe of one run is `experiments/configs/paper.py:TASK,METHOD` (data only); this module
holds what the grid tools read about the paper: the tasks of Tables 1 and 2, the methods in
the paper's row order and their titles, the swept fields (reduction factor, PHM n), the
low-resource sizes, the official training-set sizes and the paper's own scores.
`experiments.paper_runs` enumerates the grid from it, `experiments.paper_table` titles and
compares with it.

Sources: the original's configs (`seq2seq/configs/*.json`: one learning rate per method, the
`task_reduction_factor` 32 default) and scripts (`seq2seq/scripts/*.sh`: "we tried the
adapter's bottleneck size of `task_reduction_factor`=[32, 16, 8]" for every adapter method;
none for full fine-tuning, BitFit, prompt tuning, Intrinsic-SAID); the paper §5 (n in
{4, 8, 12} for PHM-Adapter, Compacter, Compacter++; §5.6 subsamples of 100 ... 4000 training
examples, Compacter++ against T5-base fine-tuning).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.data.splitting import LARGE_VALIDATION_SIZE
from compacter_jax.models import T5Config
from compacter_jax.models.config import HUB_IDS
from compacter_jax.params import PAPER_T5_BASE, resolve_model

# Paper Table 1 (GLUE) and Table 2 (SuperGLUE) tasks, in the tables' column order.
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
SUPERGLUE_TASKS = ("boolq", "cb", "copa", "multirc", "record", "wic")
TASK_TITLES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B",
               "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE", "boolq": "BoolQ", "cb": "CB",
               "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD", "wic": "WiC"}

# The methods of Tables 1 and 2 in the paper's row order (baselines, then the paper's own).
PAPER_METHODS = ("full", "adapter", "pfeiffer", "adapterdrop", "lowrank", "prompt_tuning",
                 "prompt_tuning_vocab", "intrinsic_said", "bitfit", "phm_adapter", "compacter",
                 "compacter++", "lst")  # + Ladder Side-Tuning (Sung et al. 2022), not in the paper
METHOD_TITLES = {"full": "T5-base (full)", "adapter": "Adapter", "pfeiffer": "Pfeiffer-Adapter",
                 "adapterdrop": "AdapterDrop", "lowrank": "Adapter-LowRank",
                 "prompt_tuning": "Prompt Tuning-R", "prompt_tuning_vocab": "Prompt Tuning-T",
                 "intrinsic_said": "Intrinsic-SAID", "bitfit": "BitFit",
                 "phm_adapter": "PHM-Adapter", "compacter": "Compacter",
                 "compacter++": "Compacter++", "lst": "LST (Sung et al. 2022)"}
METHOD_TITLES["attempt"] = "ATTEMPT"   # not in the paper: shown after its rows when run
METHOD_TITLES["lora"] = "LoRA"         # not in the paper: the DP grid's second method (issue 22)
# The paper's methods this library registers (Intrinsic-SAID joins once it has a preset).
METHODS = tuple(m for m in PAPER_METHODS if m in peft.method_names())
# Methods beyond the paper's tables that join its grid and tables as rows (issue 21):
# SparseAdapter (He et al. 2022) at 40% SNIP sparsity and its "Large-Sparse" setting; DSEE
# (Chen et al. 2021), low-rank + sparse updates of q and v.
EXTRA_METHODS = ("sparse_adapter", "large_sparse_adapter", "dsee")
METHOD_TITLES.update({"sparse_adapter": "SparseAdapter (40%, SNIP)",
                      "large_sparse_adapter": "SparseAdapter Large-Sparse (2x, 50%)",
                      "dsee": "DSEE (r=16, 16 sparse)"})

# The sweeps (original scripts; paper §5) and the low-resource study (paper §5.6).
REDUCTION_FACTORS = (32, 16, 8)       # bottleneck 24, 48, 96 on T5-base
PHM_DIMS = (4, 8, 12)                 # PHM n; only values that divide the sizes are run
LOW_RESOURCE_SIZES = (100, 500, 1000, 2000, 4000)
LOW_RESOURCE_METHODS = ("full", "compacter++")
PAPER_MODEL = "t5-base"

# Official training-set sizes (rows of the GLUE TSVs / SuperGLUE JSONL train files, as HF
# `datasets` and TFDS; MultiRC counts answer rows, ReCoRD queries).
OFFICIAL_TRAIN_SIZES = {"cola": 8_551, "sst2": 67_349, "mrpc": 3_668, "qqp": 363_846,
                        "stsb": 5_749, "mnli": 392_702, "qnli": 104_743, "rte": 2_490,
                        "boolq": 9_427, "cb": 250, "copa": 400, "multirc": 27_088,
                        "record": 100_730, "wic": 5_428}

# The paper's own numbers (T5-base), only what could be sourced (experiments.paper_table
# shows them under the measured rows):
# % trained: paper Table 1 (compacter_jax.params.PAPER_T5_BASE; BitFit, Intrinsic-SAID and
# full fine-tuning from the same column, COMPACTER_SPEC.md §4).
PAPER_PERCENT_TRAINED = {**{m: pct for m, (_, pct) in PAPER_T5_BASE.items()},
                         "full": 100.0, "bitfit": 0.126, "intrinsic_said": 0.009,
                         "prompt_tuning_vocab": PAPER_T5_BASE["prompt_tuning"][1]}
# Compacter++ GLUE test scores of paper Table 1, as quoted (two decimals) by AdapterHub
# (github.com/adapter-hub/website, posts/2022/03/adapter-transformers-v3-unifying-efficient-
# fine-tuning.md: "results reported in Mahabadi et al. (2021)").
PAPER_GLUE_SCORES = {"compacter++": {
    "cola": {"matthews_correlation": 61.27}, "sst2": {"accuracy": 93.81},
    "mrpc": {"accuracy": 90.69, "f1": 93.33}, "qqp": {"accuracy": 90.17, "f1": 86.93},
    "stsb": {"pearson": 90.46, "spearmanr": 90.93}, "mnli": {"accuracy": 85.71},
    "qnli": {"accuracy": 93.08}, "rte": {"accuracy": 74.82}}}
# GLUE averages stated in the paper's text (§5.3: Adapter "85.78 versus 86.48" with a
# fine-tuned output layer); the Table 1 rows above give their own average.
PAPER_GLUE_AVERAGES = {"adapter": 85.78}
PAPER_SOURCES = ("% trained: paper Table 1. Compacter++ scores: paper Table 1 as quoted by "
                 "AdapterHub (adapter-hub/website, 2022-03 adapter-transformers v3 post). "
                 "Adapter average: paper §5.3 text. The text also gives, relative to full "
                 "fine-tuning, Intrinsic-SAID -1.05, BitFit -1.53, AdapterDrop -0.65 and "
                 "Adapter-LowRank -0.68 points on average.")


def sweep_axes(method: peft.Method | str) -> dict[str, tuple[int, ...]]:
    """The method fields the paper sweeps -> their values: `reduction_factor` for every
    bottleneck-adapter method (Large-Sparse: half of each, the dense budget at 50%), plus
    `n` for the PHM ones (PHM-Adapter, Compacter, Compacter++); {} for the others (full, BitFit, prompt tuning, ...: learning rate only)."""
    method = peft.get_method(method)
    if not isinstance(method, peft.AdapterMethod):
        return {}
    axes = {"reduction_factor": REDUCTION_FACTORS}
    if method.name == "large_sparse_adapter":  # twice each dense bottleneck, half pruned
        axes["reduction_factor"] = tuple(r // 2 for r in REDUCTION_FACTORS)
    if method.projection in ("phm", "lphm"):
        axes["n"] = PHM_DIMS
    return axes


def model_config(model: str) -> T5Config:
    """The sizes of `model` (a preset, `random:<preset>`, a preset's Hub id such as
    "google-t5/t5-base", a directory with config.json, or a Hub id whose config.json is in the
    local HF cache), without loading weights.

    Raises ValueError naming the model and what is accepted.
    """
    by_hub_id = {hub: name for name, hub in HUB_IDS.items()}
    try:
        return resolve_model(by_hub_id.get(model, model))
    except ValueError as e:
        cached = huggingface_hub.try_to_load_from_cache(model, "config.json") if (
            model.count("/") == 1 and not Path(model).exists()) else None
        if isinstance(cached, str):
            return T5Config.from_hf_dict(json.loads(Path(cached).read_text()))
        raise ValueError(f"cannot read the sizes of model {model!r} (needed to know which "
                         f"reduction factors and n fit): {e}") from None


def paper_train_size(task: str, train_samples: int | None = None) -> int:
    """Training examples of the paper's train split of `task` (large tasks hold out 1,000 for
    validation), cut to `train_samples` when given (more than there are keeps all).

    Raises ValueError naming the known tasks for a task outside Tables 1 and 2.
    """
    t = data_lib.get_task(task)
    if t.name not in OFFICIAL_TRAIN_SIZES:
        raise ValueError(f"no training-set size known for task {task!r}; known: "
                         f"{', '.join(OFFICIAL_TRAIN_SIZES)}")
    n = OFFICIAL_TRAIN_SIZES[t.name]
    if not t.is_small and t.test_split is None:  # SST-2, QQP, QNLI, ReCoRD (not MNLI)
        n -= LARGE_VALIDATION_SIZE
    return n if train_samples is None else min(n, train_samples)


def config_name(axes: Mapping[str, Any], learning_rate: float,
                train_samples: int | None = None, dp_epsilon: float | None = None) -> str:
    """The run's directory name: e.g. "rf32_n4_lr3e-3", "lr3e-4", "rf16_lr3e-4_train100",
    "rf32_n4_lr3e-3_dp-eps3" (a differentially private run with target epsilon 3)."""
    short = {"reduction_factor": "rf"}
    parts = [f"{short.get(k, k)}{v}" for k, v in axes.items()]
    parts.append(f"lr{format_learning_rate(learning_rate)}")
    if train_samples:
        parts.append(f"train{train_samples}")
    if dp_epsilon is not None:
        parts.append(f"dp-eps{format_epsilon(dp_epsilon)}")
    return "_".join(parts)


def format_epsilon(epsilon: float) -> str:
    """3.0 -> "3", 0.5 -> "0.5", 7.25 -> "7.25": the shortest text that reads back the same
    float (it names workdirs and is the `--config.dp.epsilon` value the run gets)."""
    short = f"{float(epsilon):g}"
    return short if float(short) == float(epsilon) else repr(float(epsilon))


def format_learning_rate(learning_rate: float) -> str:
    """3e-3 -> "3e-3", 0.0003 -> "3e-4", 1.5e-2 -> "1.5e-2" (no padding, no "+")."""
    mantissa, exponent = f"{learning_rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"
