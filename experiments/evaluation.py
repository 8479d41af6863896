"""Evaluation of a fine-tuned T5 on one split: greedy decoding (the paper's) and/or rank
classification, the task's metrics, and per-example predictions on disk.

Batches are sorted by source length and trimmed to a few length buckets
(`compacter_jax.data.bucketed_eval_batches`), so decoding does not run on padding;
predictions are put back in the split's order through `example_index`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax import data as data_lib
from compacter_jax.atomic import atomic_write
from compacter_jax.data.metrics import jsonable
from compacter_jax.models import greedy_generate, rank_classify

EVAL_MODES = ("generate", "rank", "both")


@dataclasses.dataclass
class Evaluator:
    """Everything evaluation needs, built once per run.

    Attributes:
      task, tokenizer, model: the task, the T5 tokenizer and the (hooked) T5.
      encoded: {"validation" | "test": EncodedData}.
      batch_size: evaluation batch size; max_new_tokens: decode length.
      mode: "generate" (greedy decoding, the paper's), "rank" (the most likely label string,
        tasks with a fixed label set only) or "both" (generate is the score, rank's metrics are
        added with a "rank_" prefix).
      predictions_dir: where `{split}.jsonl` goes (None: not written).
    """

    task: data_lib.Task
    tokenizer: Any
    model: Any
    encoded: dict[str, data_lib.EncodedData]
    batch_size: int
    max_new_tokens: int
    mode: str = "generate"
    predictions_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval_mode={self.mode!r}; use one of {EVAL_MODES}")
        if self.mode != "generate" and not self.task.label_texts:
            raise ValueError(f"eval_mode={self.mode!r} needs a fixed label set; {self.task.name} "
                             "has free-text targets: use eval_mode='generate'")

    def _batches(self, split: str):
        return data_lib.bucketed_eval_batches(self.encoded[split], self.batch_size)

    def generate(self, params: Any, split: str) -> list[str]:
        """Greedy-decoded text of every row of `split`, in row order."""
        texts: list[str] = [""] * len(self.encoded[split])
        for batch in self._batches(split):
            ids = greedy_generate(self.model, params, batch["input_ids"], batch["attention_mask"],
                                  max_new_tokens=self.max_new_tokens)
            decoded = data_lib.decode_predictions(self.tokenizer, np.asarray(ids))
            for row, text in zip(batch["example_index"], decoded):
                if row >= 0:
                    texts[row] = text
        return texts

    def rank(self, params: Any, split: str) -> list[str]:
        """The most likely label string of every row of `split` (summed token log-probs)."""
        labels = list(self.task.label_texts)
        enc = self.tokenizer(labels, padding=True, return_tensors="np")
        cands, cand_mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
        texts: list[str] = [""] * len(self.encoded[split])
        for batch in self._batches(split):
            best = np.asarray(rank_classify(self.model, params, batch["input_ids"],
                                            batch["attention_mask"], cands, cand_mask))
            for row, k in zip(batch["example_index"], best):
                if row >= 0:
                    texts[row] = labels[int(k)]
        return texts

    def evaluate(self, params: Any, split: str) -> dict[str, float]:
        """The task's metrics (0-100, "score" = their mean, "num_invalid") on `split`."""
        encoded = self.encoded[split]
        groups = encoded.groups if any(g is not None for g in encoded.groups) else None
        refs = list(encoded.references)
        metrics: dict[str, float] = {}
        if self.mode in ("generate", "both"):
            texts = self.generate(params, split)
            metrics = data_lib.compute_metrics(self.task, texts, refs, groups=groups)
            self.write_predictions(split, texts)
        if self.mode in ("rank", "both"):
            ranked = self.rank(params, split)
            scores = data_lib.compute_metrics(self.task, ranked, refs, groups=groups)
            if self.mode == "rank":
                metrics = scores
                self.write_predictions(split, ranked)
            else:
                metrics.update({f"rank_{k}": v for k, v in scores.items() if k != "num_invalid"})
                self.write_predictions(f"{split}_rank", ranked, split)
        return metrics

    def write_predictions(self, name: str, texts: list[str], split: str | None = None
                          ) -> Path | None:
        """WORKDIR/predictions/{name}.jsonl: one object per example, in the split's order:
        `index` (its row in the official split file, 0-based over data rows), `source`,
        `target`, `prediction` (the generated text) and `parsed` (what the metrics scored)."""
        if self.predictions_dir is None:
            return None
        encoded = self.encoded[split or name]
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        path = self.predictions_dir / f"{name}.jsonl"
        rows = [json.dumps({
            "index": encoded.rows[i] if encoded.rows else i,
            "source": encoded.sources[i] if encoded.sources else None,
            "target": encoded.targets[i] if encoded.targets else None,
            "prediction": text,
            "parsed": jsonable(self.task.parse_prediction(text)),
            "reference": jsonable(encoded.references[i]),
        }, ensure_ascii=False) + "\n" for i, text in enumerate(texts)]
        return atomic_write(path, "".join(rows))
