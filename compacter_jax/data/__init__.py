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
    shard_for_host,
    shift_right,
    steps_per_epoch,
    train_batches,
)
from compacter_jax.data.sources import SOURCE_KINDS, Source, make_source
from compacter_jax.data.splitting import paper_splits, split_indices, splits
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
from compacter_jax.data.tfds_source import TfdsSource

__all__ = [
    "DataError", "DataState", "EncodedData", "FilesSource", "GLUE_TASKS", "INVALID_LABEL",
    "INVALID_SCORE", "SOURCE_KINDS", "SUPERGLUE_TASKS", "Source", "TASKS", "Task", "TfdsSource",
    "compute_metrics", "decode_predictions", "encode", "epoch_permutation", "eval_batches",
    "get_task", "make_batch", "make_source", "paper_splits", "shard_for_host", "shift_right",
    "split_indices", "splits", "steps_per_epoch", "task_names", "train_batches",
]
