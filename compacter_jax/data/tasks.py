"""GLUE / SuperGLUE task registry: text-to-text formatting, label names, metrics, split kind.

Examples are plain dicts with tensorflow-datasets keys (`sentence1`, `premise`, ..., `label`,
`idx`); `label` is the TFDS class index (int), the STS-B score (float), or -1 when unlabelled.
ReCoRD has `entities` and `answers` (lists of str) instead of `label`.

Formatting follows the original Compacter code (spec §6): source = "name: value" pairs joined by
spaces, no task prefix; target = the label index as a string; STS-B = score rounded to one
decimal (e.g. "3.8"). Model outputs are mapped back with `Task.parse_prediction`; text that is
not a valid label gives `INVALID_LABEL` (classification) or `INVALID_SCORE` (STS-B), which the
metrics count as wrong (see `metrics.py`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Hashable, Literal, Mapping

import numpy as np

Example = dict[str, Any]
Kind = Literal["classification", "regression", "span"]

INVALID_LABEL = -1
"""Parsed value of an unparseable classification prediction (never equal to a gold label)."""
INVALID_SCORE = -1.0
"""Parsed value of an unparseable STS-B prediction: outside the 0–5 label range, as the
original code's `string_to_float(default=-1.0)`."""
UNLABELLED = -1
"""`label` of an example without a gold label (official test splits), as in TFDS."""

_INT_RE = re.compile(r"^[0-9]+$")


def _join_fields(example: Mapping[str, Any], fields: tuple[str, ...]) -> str:
    return " ".join(f"{name}: {example[name]}" for name in fields)


def _remove_markup(text: str) -> str:
    """MultiRC paragraphs carry HTML markup (<br>, <b>); T5 and the original code drop it."""
    return re.sub(r"<(/)?b>", "", re.sub(r"<br>", " ", text))


def _multirc_source(ex: Mapping[str, Any]) -> str:
    return " ".join(
        f"{name}: {_remove_markup(str(ex[name]))}" for name in ("question", "answer", "paragraph")
    )


def _mark_span(text: str, span: str, word_index: int, mark: str) -> str:
    """Surrounds `span` starting at whitespace-word `word_index` with `mark` (T5's WSC recipe)."""
    pattern = r"^((?:\S+\s){%d})(%s)" % (int(word_index), re.escape(span))
    return re.sub(pattern, r"\1%s \2 %s" % (mark, mark), text)


def _wsc_source(ex: Mapping[str, Any]) -> str:
    text = _mark_span(ex["text"], ex["span1_text"], ex["span1_index"], "*")
    # Marking span1 adds two words ("*" twice) before span2 when span1 comes first.
    span2_index = int(ex["span2_index"]) + 2 * int(int(ex["span1_index"]) < int(ex["span2_index"]))
    text = _mark_span(text, ex["span2_text"], span2_index, "#")
    return f"text: {text}"


def _record_source(ex: Mapping[str, Any]) -> str:
    passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", ex["passage"])
    passage = re.sub(r"\n@highlight\n", ". ", passage)
    return f"query: {ex['query']} entities: {', '.join(ex['entities'])} passage: {passage}"


def _multirc_group(ex: Mapping[str, Any]) -> Hashable:
    idx = ex["idx"]
    return (int(idx["paragraph"]), int(idx["question"]))


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(x) for x in items))


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
      name: registry name ("rte", "superglue_rte", "wsc.fixed", ...).
      tfds_name: tensorflow-datasets name ("glue/rte", "super_glue/rte").
      input_fields: example keys that make up the source text, in order.
      label_names: class names in TFDS order (index -> name); () for STS-B and ReCoRD.
      metric_names: keys returned by `metrics.compute_metrics`; the task score is their mean.
      is_small: small tasks split the official validation set in half (validation / test);
        large ones hold out 1,000 training examples as validation (spec §6).
      kind: "classification", "regression" (STS-B) or "span" (ReCoRD).
      validation_split / test_split: official split names feeding the paper's validation and
        test sets when they are fixed (MNLI: validation_mismatched / validation_matched).
    """

    name: str
    tfds_name: str
    input_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    is_small: bool
    kind: Kind = "classification"
    validation_split: str = "validation"
    test_split: str | None = None
    source_fn: Callable[[Mapping[str, Any]], str] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    group_fn: Callable[[Mapping[str, Any]], Hashable] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def target_texts(self) -> tuple[str, ...]:
        """All valid classification targets ("0", "1", ...); () for STS-B / ReCoRD."""
        return tuple(str(i) for i in range(self.num_classes))

    def source(self, example: Mapping[str, Any]) -> str:
        """The model input text."""
        try:
            if self.source_fn is not None:
                return self.source_fn(example)
            return _join_fields(example, self.input_fields)
        except KeyError as e:
            raise KeyError(
                f"task {self.name}: example lacks field {e.args[0]!r} "
                f"(has {sorted(example)}; needs {list(self.input_fields)})"
            ) from None

    def targets(self, example: Mapping[str, Any]) -> tuple[str, ...]:
        """Every target text of the example (ReCoRD: one per distinct answer; else exactly one).

        Unlabelled examples (label -1, or ReCoRD without answers) give ("",).
        """
        if self.kind == "span":
            answers = _unique(example.get("answers", ()))
            return answers if answers else ("",)
        label = example["label"]
        if self.kind == "regression":
            score = float(label)
            if score == UNLABELLED:
                return ("",)
            # np.round matches the original `round_stsb_target` (round-half-even at 1 decimal).
            return (f"{float(np.round(score, 1)):.1f}",)
        label = int(label)
        if label == UNLABELLED:
            return ("",)
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"task {self.name}: label {label} out of range 0..{self.num_classes - 1} "
                f"({list(self.label_names)})"
            )
        return (str(label),)

    def format(self, example: Mapping[str, Any]) -> tuple[str, str]:
        """(source_text, target_text); ReCoRD uses its first answer as the target."""
        return self.source(example), self.targets(example)[0]

    def format_all(self, example: Mapping[str, Any]) -> list[tuple[str, str]]:
        """Training pairs: one per target (ReCoRD duplicates the source for each answer)."""
        src = self.source(example)
        return [(src, t) for t in self.targets(example)]

    def reference(self, example: Mapping[str, Any]) -> Any:
        """Gold value for the metrics: int class, float score, or tuple of answer strings."""
        if self.kind == "span":
            return _unique(example.get("answers", ()))
        if self.kind == "regression":
            return float(example["label"])
        return int(example["label"])

    def group(self, example: Mapping[str, Any]) -> Hashable | None:
        """Question group for MultiRC exact match; None for other tasks."""
        return None if self.group_fn is None else self.group_fn(example)

    def parse_prediction(self, text: str) -> Any:
        """Maps generated text back to a label; never raises.

        classification: "0".."n-1" (surrounding whitespace ignored) -> int, else INVALID_LABEL.
        regression: a finite float -> float, else INVALID_SCORE.  span: the stripped text.
        """
        text = str(text).strip()
        if self.kind == "span":
            return text
        if self.kind == "regression":
            try:
                value = float(text)
            except ValueError:
                return INVALID_SCORE
            return value if math.isfinite(value) else INVALID_SCORE
        if _INT_RE.match(text):
            value = int(text)
            if value < self.num_classes:
                return value
        return INVALID_LABEL


def _glue(name: str, fields: tuple[str, ...], labels: tuple[str, ...], metrics=("accuracy",),
          small: bool = True, **kw) -> Task:
    return Task(name=name, tfds_name=f"glue/{name}", input_fields=fields, label_names=labels,
                metric_names=tuple(metrics), is_small=small, **kw)


def _sg(name: str, config: str, fields: tuple[str, ...], labels: tuple[str, ...],
        metrics=("accuracy",), small: bool = True, **kw) -> Task:
    return Task(name=name, tfds_name=f"super_glue/{config}", input_fields=fields,
                label_names=labels, metric_names=tuple(metrics), is_small=small, **kw)


_NLI2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")

_TASK_LIST = [
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    _glue("sst2", ("sentence",), ("negative", "positive"), small=False),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
          small=False),
    _glue("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"), kind="regression"),
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          small=False, validation_split="validation_mismatched", test_split="validation_matched"),
    _glue("qnli", ("question", "sentence"), _NLI2, small=False),
    _glue("rte", ("sentence1", "sentence2"), _NLI2),
    _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    _sg("boolq", "boolq", ("question", "passage"), _BOOL),
    _sg("cb", "cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
        ("f1_macro", "accuracy")),
    # The original omits `question` (cause/effect); we keep it, else the task is ambiguous.
    _sg("copa", "copa", ("premise", "choice1", "choice2", "question"), ("choice1", "choice2")),
    _sg("multirc", "multirc", ("question", "answer", "paragraph"), _BOOL, ("f1", "em"),
        source_fn=_multirc_source, group_fn=_multirc_group),
    _sg("record", "record", ("query", "entities", "passage"), (), ("f1", "em"), small=False,
        kind="span", source_fn=_record_source),
    _sg("superglue_rte", "rte", ("premise", "hypothesis"), _NLI2),
    _sg("wic", "wic", ("sentence1", "sentence2", "word"), _BOOL),
    _sg("wsc.fixed", "wsc.fixed", ("text", "span1_index", "span2_index", "span1_text",
                                   "span2_text"), _BOOL, source_fn=_wsc_source),
]

TASKS: Mapping[str, Task] = {t.name: t for t in _TASK_LIST}
GLUE_TASKS = tuple(t.name for t in _TASK_LIST if t.tfds_name.startswith("glue/"))
SUPERGLUE_TASKS = tuple(t.name for t in _TASK_LIST if t.tfds_name.startswith("super_glue/"))

# Other spellings in use: the original repo's "superglue-cb", TFDS's "super_glue/cb", "glue/rte".
_ALIASES: dict[str, str] = {}
for _t in _TASK_LIST:
    _ALIASES[_t.tfds_name] = _t.name
    if _t.name in SUPERGLUE_TASKS:
        _short = _t.tfds_name.split("/", 1)[1]
        _ALIASES[f"superglue-{_short}"] = _t.name
        _ALIASES[f"superglue_{_short}"] = _t.name
_ALIASES["superglue_rte"] = "superglue_rte"


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def get_task(name: str | Task) -> Task:
    """Looks a task up by registry name or alias; a Task passes through.

    Raises ValueError listing the valid names for an unknown one.
    """
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}")
    return TASKS[key]
