"""Evaluation of a fine-tuned T5 on one split: greedy decoding (the paper's) or rank
classification, the task's metrics, and per-example predictions on disk."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax.models import greedy_generate


@dataclasses.dataclass
class Evaluator:
    """Everything evaluation needs, built once per run.

    Attributes:
      task, tokenizer, model: the task, the T5 tokenizer and the (hooked) T5.
      encoded: {"validation" | "test": EncodedData}.
      batch_size: evaluation batch size; max_new_tokens: decode length.
      predictions_dir: where `{split}.jsonl` goes (None: not written).
    """

    task: data_lib.Task
    tokenizer: Any
    model: Any
    encoded: dict[str, data_lib.EncodedData]
    batch_size: int
    max_new_tokens: int
    predictions_dir: Path | None = None

    def predict(self, params: Any, split: str) -> list[str]:
        """Greedy-decoded text of every row of `split`, in row order."""
        encoded = self.encoded[split]
        texts: list[str] = [""] * len(encoded)
        for batch in data_lib.eval_batches(encoded, self.batch_size):
            ids = greedy_generate(self.model, params, batch["input_ids"], batch["attention_mask"],
                                  max_new_tokens=self.max_new_tokens)
            decoded = data_lib.decode_predictions(self.tokenizer, np.asarray(ids))
            for row, text in zip(batch["example_index"], decoded):
                if row >= 0:
                    texts[row] = text
        return texts

    def evaluate(self, params: Any, split: str) -> dict[str, float]:
        """The task's metrics (0-100, "score" = their mean, "num_invalid") on `split`."""
        encoded = self.encoded[split]
        texts = self.predict(params, split)
        groups = encoded.groups if any(g is not None for g in encoded.groups) else None
        metrics = data_lib.compute_metrics(self.task, texts, list(encoded.references),
                                           groups=groups)
        if self.predictions_dir is not None:
            self.write_predictions(split, texts)
        return metrics

    def write_predictions(self, split: str, texts: list[str]) -> Path:
        """WORKDIR/predictions/{split}.jsonl: one object per example."""
        assert self.predictions_dir is not None
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        encoded = self.encoded[split]
        path = self.predictions_dir / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"row": i, "prediction": text,
                                    "parsed": _jsonable(self.task.parse_prediction(text)),
                                    "reference": _jsonable(encoded.references[i])}) + "\n")
        tmp.replace(path)
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
