"""Task metrics (spec §6), on the 0–100 scale of the paper's tables.

`compute_metrics(task, predictions, references)` parses generated texts with
`Task.parse_prediction` and returns the task's metrics plus
  "score": the mean of the task's metrics (the number reported per task), and
  "num_invalid": how many predictions could not be parsed.

Unparseable predictions always count as wrong (as the original code):
  accuracy / exact match: never equal to a gold label;
  binary F1 and Matthews correlation: replaced by the opposite of the gold label;
  macro F1 (CB): a miss for the gold class, a false positive for no class;
  Pearson / Spearman (STS-B): the value -1.0, below every gold score (0–5);
  a correlation that is undefined (constant predictions) is reported as 0.
"""

from __future__ import annotations

import collections
import re
import string
import warnings
from typing import Any, Hashable, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics

from compacter_jax.data.tasks import INVALID_LABEL, INVALID_SCORE, Task, get_task


def _as_int_arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions, dtype=np.int64)
    refs = np.asarray(references, dtype=np.int64)
    if preds.shape != refs.shape or preds.ndim != 1:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be equal 1-D")
    if preds.size == 0:
        raise ValueError("no predictions to score")
    return preds, refs


def _flip_invalid_binary(preds: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Invalid binary predictions become the wrong class (the original `f1_score_with_invalid`)."""
    invalid = (preds != 0) & (preds != 1)
    return np.where(invalid, 1 - refs, preds)


def accuracy(predictions, references) -> float:
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(np.mean(preds == refs))


def f1_binary(predictions, references) -> float:
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(sklearn.metrics.f1_score(refs, _flip_invalid_binary(preds, refs),
                                                  zero_division=0))


def matthews_corr(predictions, references) -> float:
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(sklearn.metrics.matthews_corrcoef(refs, _flip_invalid_binary(preds, refs)))


def f1_macro(predictions, references, num_classes: int) -> float:
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(sklearn.metrics.f1_score(refs, preds, labels=list(range(num_classes)),
                                                  average="macro", zero_division=0))


def _float_arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64)
    if preds.shape != refs.shape or preds.ndim != 1 or preds.size == 0:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be equal, "
                         "1-D and non-empty")
    return np.where(np.isfinite(preds), preds, INVALID_SCORE), refs


def _corr(fn, predictions, references) -> float:
    preds, refs = _float_arrays(predictions, references)
    if preds.size < 2 or np.all(preds == preds[0]) or np.all(refs == refs[0]):
        return 0.0  # undefined correlation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(refs, preds)[0])
    return 0.0 if np.isnan(value) else 100.0 * value


def pearson(predictions, references) -> float:
    return _corr(scipy.stats.pearsonr, predictions, references)


def spearman(predictions, references) -> float:
    return _corr(scipy.stats.spearmanr, predictions, references)


def group_exact_match(predictions, references, groups: Sequence[Hashable]) -> float:
    """MultiRC EM: the fraction of question groups whose answers are all labelled correctly."""
    preds, refs = _as_int_arrays(predictions, references)
    if len(groups) != len(preds):
        raise ValueError(f"{len(groups)} groups for {len(preds)} predictions")
    all_right: dict[Hashable, bool] = {}
    for g, p, r in zip(groups, preds, refs):
        all_right[g] = all_right.get(g, True) and bool(p == r)
    return 100.0 * float(np.mean(list(all_right.values())))


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, truth: str) -> float:
    pred, gold = prediction.split(), truth.split()
    if not pred or not gold:
        return float(pred == gold)
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]
                ) -> tuple[float, float]:
    """(exact match, token F1), each the max over an example's gold answers, averaged (x100)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    em, f1 = [], []
    for pred, answers in zip(predictions, references):
        if isinstance(answers, str):
            answers = [answers]
        p = normalize_answer(pred)
        golds = [normalize_answer(a) for a in answers] or [""]
        em.append(max(float(p == g) for g in golds))
        f1.append(max(_token_f1(p, g) for g in golds))
    return 100.0 * float(np.mean(em)), 100.0 * float(np.mean(f1))


def _parse(task: Task, prediction: Any) -> Any:
    value = task.parse_prediction(prediction) if isinstance(prediction, str) else prediction
    if task.kind == "classification":
        valid = isinstance(value, (int, np.integer)) and 0 <= value < task.num_classes
        return int(value) if valid else INVALID_LABEL
    if task.kind == "regression":
        value = float(value)
        return value if np.isfinite(value) else INVALID_SCORE
    return str(value)


def compute_metrics(task: Task | str, predictions: Sequence[Any], references: Sequence[Any],
                    groups: Sequence[Hashable] | None = None) -> dict[str, float]:
    """Scores predictions against references.

    Args:
      predictions: generated texts (parsed by `task.parse_prediction`) or already-parsed labels.
      references: gold values from `task.reference(example)` (int / float / answer tuple).
      groups: MultiRC only: `task.group(example)` per prediction (question ids for EM).

    Returns:
      {metric name: value (0–100), ..., "score": mean of the task's metrics,
       "num_invalid": number of unparseable predictions}.
    """
    task = get_task(task)
    if len(predictions) != len(references):
        raise ValueError(f"{task.name}: {len(predictions)} predictions for "
                         f"{len(references)} references")
    preds = [_parse(task, p) for p in predictions]
    sentinel = {"classification": INVALID_LABEL, "regression": INVALID_SCORE}.get(task.kind)
    num_invalid = sum(1 for p in preds if sentinel is not None and p == sentinel)
    out: dict[str, float] = {}
    for name in task.metric_names:
        if name == "accuracy":
            out[name] = accuracy(preds, references)
        elif name == "f1" and task.kind == "span":
            out["em"], out["f1"] = squad_em_f1(preds, references)
        elif name == "f1":
            out[name] = f1_binary(preds, references)
        elif name == "em" and task.kind == "span":
            continue  # computed with f1
        elif name == "em":
            if groups is None:
                raise ValueError(f"{task.name}: exact match needs `groups` (task.group(example))")
            out[name] = group_exact_match(preds, references, groups)
        elif name == "matthews_correlation":
            out[name] = matthews_corr(preds, references)
        elif name == "f1_macro":
            out[name] = f1_macro(preds, references, task.num_classes)
        elif name == "pearson":
            out[name] = pearson(preds, references)
        elif name == "spearmanr":
            out[name] = spearman(preds, references)
        else:
            raise ValueError(f"{task.name}: no implementation for metric {name!r}")
    out["score"] = float(np.mean([out[m] for m in task.metric_names]))
    out["num_invalid"] = float(num_invalid)
    return out
