"""Text-to-text GLUE / SuperGLUE data: task registry, sources, paper splits, metrics, batches.

    task = get_task("rte")
    source = make_source("files")                     # or make_source("tfds", data_dir=...)
    data = paper_splits(task, source, data_seed=42)   # {"train", "validation", "test"}
    enc = encode(task, data["train"], tokenizer, max_source_length=128, max_target_length=8,
                 train=True)
    for batch, state in train_batches(enc, 32, seed=42): ...
    compute_metrics(task, predicted_texts, [task.reference(ex) for ex in data["test"]])
"""

from compacter_jax.data.files import DataError, FilesSource
from compacter_jax.data.metrics import compute_metrics
from compacter_jax.data.pipeline import (
    DataState,
    EncodedData,
    decode_predictions,
    encode,
    epoch_permutation,
    eval_batches,
    make_batch,
    pad_batch,
    shard_for_host,
    steps_per_epoch,
    train_batches,
    trim_source,
)
from compacter_jax.data.packing import (PackingPlan, bucketed_eval_batches, fill, pack_batch,
                                        plan_packing, unpack_batch)
from compacter_jax.data.randperm import torch_randperm
from compacter_jax.data.sources import SOURCE_KINDS, AutoSource, Source, make_source
from compacter_jax.data.splitting import (PaperSplit, limit_eval_rows, load_paper_splits,
                                          paper_splits, split_indices, splits)
from compacter_jax.data.tasks import (
    GLUE_TASKS,
    INVALID_LABEL,
    INVALID_SCORE,
    SUPERGLUE_TASKS,
    TASKS,
    Task,
    get_task,
    task_names,
)
from compacter_jax.data.tfds_source import DownloadUnavailableError, TfdsSource

__all__ = [
    "AutoSource", "DataError", "DataState", "DownloadUnavailableError", "EncodedData", "FilesSource", "GLUE_TASKS", "INVALID_LABEL",
    "INVALID_SCORE", "PackingPlan", "PaperSplit", "SOURCE_KINDS", "SUPERGLUE_TASKS", "Source",
    "TASKS", "Task", "TfdsSource", "bucketed_eval_batches", "compute_metrics",
    "decode_predictions", "encode", "epoch_permutation", "eval_batches", "fill", "get_task",
    "limit_eval_rows", "load_paper_splits", "make_batch", "make_source", "pack_batch",
    "pad_batch", "paper_splits", "plan_packing", "shard_for_host", "split_indices", "splits",
    "steps_per_epoch", "task_names", "torch_randperm", "train_batches", "trim_source",
    "unpack_batch",
]
