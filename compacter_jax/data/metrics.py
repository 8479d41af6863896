"""Task metrics on the 0–100 scale of the paper's tables, scored as the original Compacter code
(`seq2seq/metrics/metrics.py`, which compares decoded strings).

`compute_metrics(task, predictions, references)` returns the task's metrics plus
  "score": the mean of the task's metrics (the original's `average_metrics`, the number
  reported per task and used to pick the best checkpoint), and
  "num_invalid": how many predictions are not a valid label / finite score.

Invalid predictions (text that is not exactly a label string after `strip`):
  accuracy / exact match: wrong (never equal to the gold string);
  binary F1 (MRPC, QQP, MultiRC): replaced by the opposite of the gold label
    (`f1_score_with_invalid`);
  Matthews correlation (CoLA): *not* replaced: each distinct invalid text is a class of its
    own in sklearn's multiclass MCC, as the original passes the raw strings;
  macro F1 (CB): a miss for the gold class and a false positive for none of the 3 classes;
  Pearson / Spearman (STS-B): `float(text)`, -1.0 when that raises; "nan" / "inf" parse, and
    a correlation that comes out NaN (constant, NaN or infinite predictions for Pearson) is 0.
ReCoRD: SQuAD EM / F1 (max over gold answers); the original evaluates one duplicated row per
gold answer, so by default each query weighs its number of answers (`record_weights`).
"""

from __future__ import annotations

import collections
import math
import re
import string
import warnings
from typing import Any, Hashable, Sequence

import numpy as np
import scipy.stats
import sklearn.metrics

from compacter_jax.data.tasks import INVALID_SCORE, Task, get_task


def _as_int_arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    preds = np.asarray(predictions, dtype=np.int64)
    refs = np.asarray(references, dtype=np.int64)
    if preds.shape != refs.shape or preds.ndim != 1:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be equal 1-D")
    if preds.size == 0:
        raise ValueError("no predictions to score")
    return preds, refs


def accuracy(predictions, references) -> float:
    """Percentage of predictions equal to the reference (invalid codes < 0 never are)."""
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(np.mean(preds == refs))


def f1_binary(predictions, references) -> float:
    """Binary F1 (positive class 1) where a prediction other than 0/1 becomes the opposite of
    its reference (the original `f1_score_with_invalid`)."""
    preds, refs = _as_int_arrays(predictions, references)
    flipped = np.where((preds != 0) & (preds != 1), 1 - refs, preds)
    return 100.0 * float(sklearn.metrics.f1_score(refs, flipped, zero_division=0))


def matthews_corr(predictions, references) -> float:
    """sklearn's (multiclass) MCC on the codes as given: invalid codes stay classes of their
    own, as in the original, which passes the raw prediction strings."""
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(sklearn.metrics.matthews_corrcoef(refs, preds))


def f1_multiclass(predictions, references, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over classes 0..num_classes-1 (original
    `mean_multiclass_f1`); predictions outside them only count as misses."""
    preds, refs = _as_int_arrays(predictions, references)
    return 100.0 * float(sklearn.metrics.f1_score(refs, preds, labels=list(range(num_classes)),
                                                  average="macro", zero_division=0))


def _corr(fn, predictions, references) -> float:
    preds = np.asarray(predictions, dtype=np.float64)
    refs = np.asarray(references, dtype=np.float64)
    if preds.shape != refs.shape or preds.ndim != 1 or preds.size == 0:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} must be equal, "
                         "1-D and non-empty")
    if preds.size < 2:
        return 0.0  # undefined (scipy raises)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant / non-finite input: NaN, reported as 0
        value = 100.0 * float(fn(refs, preds)[0])
    return 0.0 if math.isnan(value) else value


def pearson(predictions, references) -> float:
    """100 x Pearson r; 0 when it is NaN (as the original). Non-finite predictions give NaN."""
    return _corr(scipy.stats.pearsonr, predictions, references)


def spearman(predictions, references) -> float:
    """100 x Spearman rho; 0 when NaN. Ranks keep +-inf as the extreme values (as scipy)."""
    return _corr(scipy.stats.spearmanr, predictions, references)


def group_exact_match(predictions, references, groups: Sequence[Hashable]) -> float:
    """MultiRC EM: the percentage of question groups whose answers are all labelled right."""
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
    """T5's token F1: 0 without a common token, so also 0 for two empty strings."""
    pred, gold = prediction.split(), truth.split()
    same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: Sequence[str], references: Sequence[Sequence[str]],
                weights: Sequence[float] | None = None) -> tuple[float, float]:
    """(exact match, token F1) x100: each the max over an example's gold answers, then the
    (weighted) mean over examples. An example without gold answers scores 0."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    em, f1 = [], []
    for pred, answers in zip(predictions, references):
        if isinstance(answers, str):
            answers = [answers]
        p = normalize_answer(pred)
        golds = [normalize_answer(a) for a in answers]
        em.append(max((float(p == g) for g in golds), default=0.0))
        f1.append(max((_token_f1(p, g) for g in golds), default=0.0))
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != (len(em),):
        raise ValueError(f"{w.shape} weights for {len(em)} examples")
    return (100.0 * float(np.average(em, weights=w)), 100.0 * float(np.average(f1, weights=w)))


def record_weights(references: Sequence[Sequence[str]]) -> list[int]:
    """Rows the original evaluates per ReCoRD query: one per gold answer (at least one)."""
    return [max(1, len(answers)) for answers in references]


def _class_codes(task: Task, predictions: Sequence[Any]) -> tuple[list[int], int]:
    """Label index per valid prediction; each distinct invalid one gets its own code -1, -2, ..

    Texts are parsed with `task.parse_prediction`; ints pass when in range. Returns
    (codes, number of invalid predictions).
    """
    codes, invalid_codes = [], {}
    for p in predictions:
        value = task.parse_prediction(p) if isinstance(p, str) else p
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and (
                0 <= value < task.num_classes):
            codes.append(int(value))
            continue
        key = str(p).strip() if isinstance(p, str) else ("parsed", repr(p))
        codes.append(invalid_codes.setdefault(key, -1 - len(invalid_codes)))
    return codes, sum(c < 0 for c in codes)


def _scores(predictions: Sequence[Any]) -> tuple[list[float], int]:
    """STS-B values as the original `string_to_float`: `float(text)`, INVALID_SCORE when that
    raises; plus the count of invalid ones (unparseable or non-finite)."""
    values, invalid = [], 0
    for p in predictions:
        if isinstance(p, str):
            try:
                value, unparseable = float(p.strip()), False
            except ValueError:
                value, unparseable = INVALID_SCORE, True
        else:
            value = float(p)
            unparseable = value == INVALID_SCORE
        invalid += unparseable or not math.isfinite(value)
        values.append(value)
    return values, invalid


def _check_references(task: Task, references: Sequence[Any]) -> None:
    if task.kind == "classification":
        bad = [r for r in references if not (isinstance(r, (int, np.integer))
                                             and 0 <= r < task.num_classes)]
        what = f"class indices 0..{task.num_classes - 1}"
    elif task.kind == "regression":
        bad = [r for r in references if not math.isfinite(float(r)) or float(r) == INVALID_SCORE]
        what = "finite scores (task.reference(example))"
    else:
        return
    if bad:
        raise ValueError(f"{task.name}: references must be {what}; got {bad[:5]} "
                         f"({len(bad)} bad; unlabelled examples cannot be scored)")


def compute_metrics(task: Task | str, predictions: Sequence[Any], references: Sequence[Any],
                    groups: Sequence[Hashable] | None = None,
                    weight_record_by_answers: bool = True) -> dict[str, float]:
    """Scores predictions against references.

    Args:
      predictions: generated texts (parsed by `task.parse_prediction`) or already-parsed
        labels. Pass texts for CoLA: distinct invalid texts are distinct MCC classes, while
        parsed ones all collapse into INVALID_LABEL.
      references: gold values from `task.reference(example)` (int / float / answer tuple).
      groups: MultiRC only: `task.group(example)` per prediction (question ids for EM).
      weight_record_by_answers: ReCoRD only: weigh each query by its number of gold answers,
        as the original, which scores one row per answer; False: each query once.

    Returns:
      {metric name: value (0–100), ..., "score": mean of the task's metrics,
       "num_invalid": number of invalid predictions}.
    """
    task = get_task(task)
    if len(predictions) != len(references):
        raise ValueError(f"{task.name}: {len(predictions)} predictions for "
                         f"{len(references)} references")
    if not predictions:
        raise ValueError(f"{task.name}: no predictions to score")
    _check_references(task, references)
    out: dict[str, float] = {}
    if task.kind == "span":
        texts = [task.parse_prediction(p) for p in predictions]
        weights = record_weights(references) if weight_record_by_answers else None
        out["em"], out["f1"] = squad_em_f1(texts, references, weights)
        num_invalid = 0
    elif task.kind == "regression":
        values, num_invalid = _scores(predictions)
        out["pearson"] = pearson(values, references)
        out["spearmanr"] = spearman(values, references)
    else:
        codes, num_invalid = _class_codes(task, predictions)
        for name in task.metric_names:
            if name == "accuracy":
                out[name] = accuracy(codes, references)
            elif name == "f1":
                out[name] = f1_binary(codes, references)
            elif name == "em":
                if groups is None:
                    raise ValueError(f"{task.name}: exact match needs `groups` "
                                     "(task.group(example))")
                out[name] = group_exact_match(codes, references, groups)
            elif name == "matthews_correlation":
                out[name] = matthews_corr(codes, references)
            elif name == "f1_multiclass":
                out[name] = f1_multiclass(codes, references, task.num_classes)
            else:
                raise ValueError(f"{task.name}: no implementation for metric {name!r}")
    out = {name: out[name] for name in task.metric_names}
    out["score"] = float(np.mean([out[m] for m in task.metric_names]))
    out["num_invalid"] = float(num_invalid)
    return out


def jsonable(value: Any) -> Any:
    """`value` as JSON holds it (what prediction files and served answers write): tuples and
    lists as lists, dicts with their values converted, numpy scalars as Python numbers, and
    NaN / inf as the strings "nan" / "inf" / "-inf" (JSON has no such numbers)."""
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
