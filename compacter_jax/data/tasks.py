"""GLUE / SuperGLUE task registry: text-to-text formatting, label names, metrics, split kind.

Examples are plain dicts with tensorflow-datasets keys (`sentence1`, `premise`, ..., `label`,
`idx`); `label` is the TFDS class index (int), the STS-B score (float), or -1 when unlabelled.
ReCoRD has `entities` and `answers` (lists of str) instead of `label`.

Formatting is the original Compacter code's (`seq2seq/data/tasks.py`, docs/tasks.md), word for
word: source = "<field word> <value>" pairs joined by single spaces, where the field word is
the key with a colon ("sentence1:") except MNLI's "hypothesis" (no colon in the original);
`add_prefix=True` puts the original's task name first ("rte sentence1: ...",
"superglue-cb premise: ..."), which the original does unless adapters are trained; ReCoRD's
source always starts with "record". Target = the label index as a string; STS-B = the score
rounded to one decimal by the original's `round_stsb_target`, from the float32 value that
HF datasets and TFDS store. Model outputs are mapped back with `Task.parse_prediction`: the
original compares decoded strings, so only the exact label strings (after `strip`) are valid;
anything else is `INVALID_LABEL`, or for STS-B `float(text)` with the default -1.0.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Hashable, Literal, Mapping

import numpy as np

Example = dict[str, Any]
Kind = Literal["classification", "regression", "span"]

INVALID_LABEL = -1
"""Parsed value of an unparseable classification prediction (never equal to a gold label)."""
INVALID_SCORE = -1.0
"""Parsed value of an unparseable STS-B prediction, as the original `string_to_float`'s
default: outside the 0–5 label range."""
UNLABELLED = -1
"""`label` of an example without a gold label (official test splits), as in TFDS."""
STSB_SCORE_RANGE = (0.0, 5.0)
"""Valid STS-B gold scores (inclusive)."""
DEFAULT_MAX_TARGET_LENGTH = 128
"""The original's `max_target_length` default: the target length of tasks without a label
list (ReCoRD), and its generation `max_length` (`val_max_target_length`) for every task."""

# The original's STS-B `labels_list` (it sets the STS-B target length): 0.0, 0.2, ..., 5.0.
_STSB_LENGTH_LABELS = tuple(str(np.round(x, decimals=1)) for x in np.arange(0, 5.2, 0.2))


def round_stsb_target(label: float) -> float:
    """The original's `round_stsb_target`, verbatim in effect: round to one decimal.

    (It multiplies and divides by 5 before rounding, meaning to round to 0.2 steps as T5 does,
    but the division cancels the multiplication.) np.round rounds half to even on the binary
    value, so the result depends on the float width of `label`: see `stsb_target`.
    """
    return float(np.round((label * 5) / 5, decimals=1))


def stsb_target(score: float) -> str:
    """STS-B target text as the original writes it: `str(round_stsb_target(label))`, where
    `label` is the float32 score HF datasets / TFDS store, widened to a Python float.

    E.g. 3.8 -> "3.8", 5 -> "5.0", 4.75 -> "4.8", and 0.85 -> "0.9" (float32 0.85 is just
    above 0.85; the float64 value, just below, would give "0.8").
    """
    return str(round_stsb_target(float(np.float32(score))))


def _text(example: Mapping[str, Any], key: str) -> str:
    value = example[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is {type(value).__name__} {value!r}, expected text "
                         "(str); fix the data row or the source that produced it")
    return value


def _remove_markup(text: str) -> str:
    """MultiRC text carries HTML markup (<br>, <b>); the original drops it from each field."""
    return re.sub(r"<(/)?b>", "", re.sub(r"<br>", " ", text))


def _multirc_source(ex: Mapping[str, Any]) -> str:
    return " ".join(f"{name}: {_remove_markup(_text(ex, name))}"
                    for name in ("question", "answer", "paragraph"))


def _mark_span(text: str, span: str, word_index: int, mark: str) -> str:
    """Surrounds `span` starting at whitespace-word `word_index` with `mark` (T5's WSC recipe).

    Deviation: the span is regex-escaped. The original pastes it into the pattern raw, which
    gives the same result for spans whose only metacharacter is "." (it matches itself at the
    anchored position) and raises re.error or mis-marks for spans with "(", "?", "+", ...
    """
    pattern = r"^((?:\S+\s){%d})(%s)" % (int(word_index), re.escape(span))
    return re.sub(pattern, r"\1%s \2 %s" % (mark, mark), text)


def _wsc_source(ex: Mapping[str, Any]) -> str:
    text = _mark_span(_text(ex, "text"), _text(ex, "span1_text"), ex["span1_index"], "*")
    # Marking span1 adds two words ("*" twice) before span2 when span1 comes first.
    span2_index = int(ex["span2_index"]) + 2 * int(int(ex["span1_index"]) < int(ex["span2_index"]))
    text = _mark_span(text, _text(ex, "span2_text"), span2_index, "#")
    return f"text: {text}"


def _record_source(ex: Mapping[str, Any]) -> str:
    passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", _text(ex, "passage"))
    passage = re.sub(r"\n@highlight\n", ". ", passage)
    entities = ", ".join(str(e) for e in ex["entities"])
    # "record" is part of the original's ReCoRD input (its task prefix comes before it).
    return f"record query: {_text(ex, 'query')} entities: {entities} passage: {passage}"


def _multirc_group(ex: Mapping[str, Any]) -> Hashable:
    # The original (and T5) group answers by the question index alone; SuperGLUE numbers
    # questions across the whole split, so this is one group per question.
    return int(ex["idx"]["question"])


def _unique(items) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(x) for x in items))


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
      name: registry name ("rte", "superglue_rte", "wsc.fixed", ...).
      tfds_name: tensorflow-datasets name ("glue/rte", "super_glue/rte").
      prefix: the original code's task name, written first when `add_prefix=True`
        ("rte", "superglue-cb", "superglue-wsc.fixed", ...).
      input_fields: example keys that make up the source text, in order.
      label_names: class names in TFDS order (index -> name); () for STS-B and ReCoRD.
      metric_names: keys returned by `metrics.compute_metrics`; the task score is their mean.
      is_small: small tasks split the official validation set in half (validation / test);
        large ones hold out 1,000 training examples as validation (spec §6).
      kind: "classification", "regression" (STS-B) or "span" (ReCoRD).
      validation_split / test_split: official split names feeding the paper's validation and
        test sets when they are fixed (MNLI: validation_mismatched / validation_matched).
      field_words: the word written before each input field (default "<field>:").
    """

    name: str
    tfds_name: str
    prefix: str
    input_fields: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    is_small: bool
    kind: Kind = "classification"
    validation_split: str = "validation"
    test_split: str | None = None
    field_words: tuple[str, ...] | None = None
    source_fn: Callable[[Mapping[str, Any]], str] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )
    group_fn: Callable[[Mapping[str, Any]], Hashable] | None = dataclasses.field(
        default=None, compare=False, repr=False
    )

    def __post_init__(self):
        if self.field_words is not None and len(self.field_words) != len(self.input_fields):
            raise ValueError(f"task {self.name}: {len(self.field_words)} field_words for "
                             f"{len(self.input_fields)} input_fields")

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def target_texts(self) -> tuple[str, ...]:
        """All valid classification targets ("0", "1", ...); () for STS-B / ReCoRD."""
        return tuple(str(i) for i in range(self.num_classes))

    @property
    def label_texts(self) -> tuple[str, ...] | None:
        """The original's `labels_list`, which sets the target length: the class targets,
        STS-B's "0.0", "0.2", ..., "5.0", or None (ReCoRD: free text)."""
        if self.kind == "regression":
            return _STSB_LENGTH_LABELS
        return self.target_texts or None

    def max_target_length(self, tokenizer, default: int = DEFAULT_MAX_TARGET_LENGTH) -> int:
        """The target length the original uses for this task (its `get_max_target_length`).

        Args:
          tokenizer: the T5 tokenizer; `tokenizer.encode(text)` must append EOS, as HF's does.
          default: the length of free-text tasks (the original's `max_target_length`, 128).

        Returns:
          max token count (EOS included) over `label_texts`, e.g. 3 for "0"/"1" with the T5
          vocabulary ("0" -> "▁", "0", "</s>"); `default` when there is no label list.
        """
        texts = self.label_texts
        if texts is None:
            return int(default)
        return max(len(tokenizer.encode(text)) for text in texts)

    def source(self, example: Mapping[str, Any], add_prefix: bool = False) -> str:
        """The model input text; `add_prefix` writes the original's task name first.

        Raises:
          KeyError: the example lacks an input field.  ValueError: a text field is not a str.
        """
        try:
            if self.source_fn is not None:
                body = self.source_fn(example)
            else:
                words = self.field_words or tuple(f"{f}:" for f in self.input_fields)
                body = " ".join(f"{word} {_text(example, field)}"
                                for word, field in zip(words, self.input_fields))
        except KeyError as e:
            raise KeyError(
                f"task {self.name}: example lacks field {e.args[0]!r} "
                f"(has {sorted(example)}; needs {list(self.input_fields)})"
            ) from None
        except ValueError as e:
            raise ValueError(f"task {self.name}: {e}") from None
        return f"{self.prefix} {body}" if add_prefix else body

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
            return (stsb_target(score),)
        label = int(label)
        if label == UNLABELLED:
            return ("",)
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"task {self.name}: label {label} out of range 0..{self.num_classes - 1} "
                f"({list(self.label_names)})"
            )
        return (str(label),)

    def format(self, example: Mapping[str, Any], add_prefix: bool = False) -> tuple[str, str]:
        """(source_text, target_text); ReCoRD uses its first answer as the target."""
        return self.source(example, add_prefix), self.targets(example)[0]

    def format_all(self, example: Mapping[str, Any], add_prefix: bool = False
                   ) -> list[tuple[str, str]]:
        """Training pairs: one per target (ReCoRD duplicates the source for each answer)."""
        src = self.source(example, add_prefix)
        return [(src, t) for t in self.targets(example)]

    def reference(self, example: Mapping[str, Any]) -> Any:
        """Gold value for the metrics: int class, float score, or tuple of answer strings.

        STS-B: the rounded target (e.g. 3.8 for a raw 3.75), because the original correlates
        predictions with its decoded target strings, not with the raw scores.
        """
        if self.kind == "span":
            return _unique(example.get("answers", ()))
        if self.kind == "regression":
            target = self.targets(example)[0]
            return float(target) if target else float(UNLABELLED)
        return int(example["label"])

    def group(self, example: Mapping[str, Any]) -> Hashable | None:
        """Question group for MultiRC exact match; None for other tasks."""
        return None if self.group_fn is None else self.group_fn(example)

    def parse_prediction(self, text: str) -> Any:
        """Maps generated text back to a label, as the original compares strings; never raises.

        classification: exactly one of `target_texts` after `strip()` ("1", " 1\\n") -> int;
          anything else ("01", "1.0", "", "entailment") -> INVALID_LABEL.
        regression: `float(text)` (the original `string_to_float`: "nan" and "inf" parse),
          INVALID_SCORE (-1.0) when that raises.  span: the stripped text.
        """
        text = str(text).strip()
        if self.kind == "span":
            return text
        if self.kind == "regression":
            try:
                return float(text)
            except ValueError:
                return INVALID_SCORE
        targets = self.target_texts
        return targets.index(text) if text in targets else INVALID_LABEL


def _glue(name: str, fields: tuple[str, ...], labels: tuple[str, ...], metrics=("accuracy",),
          small: bool = True, **kw) -> Task:
    return Task(name=name, tfds_name=f"glue/{name}", prefix=name, input_fields=fields,
                label_names=labels, metric_names=tuple(metrics), is_small=small, **kw)


def _sg(name: str, config: str, fields: tuple[str, ...], labels: tuple[str, ...],
        metrics=("accuracy",), small: bool = True, **kw) -> Task:
    return Task(name=name, tfds_name=f"super_glue/{config}", prefix=f"superglue-{config}",
                input_fields=fields, label_names=labels, metric_names=tuple(metrics),
                is_small=small, **kw)


_NLI2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")

_TASK_LIST = [
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    _glue("sst2", ("sentence",), ("negative", "positive"), small=False),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
          small=False),
    _glue("stsb", ("sentence1", "sentence2"), (), ("pearson", "spearmanr"), kind="regression"),
    # "hypothesis" without a colon: the original's spelling (its MNLI only), kept to match.
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
          small=False, validation_split="validation_mismatched", test_split="validation_matched",
          field_words=("premise:", "hypothesis")),
    _glue("qnli", ("question", "sentence"), _NLI2, small=False),
    _glue("rte", ("sentence1", "sentence2"), _NLI2),
    _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    _sg("boolq", "boolq", ("question", "passage"), _BOOL),
    _sg("cb", "cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
        ("f1_multiclass", "accuracy")),
    # As the original: no `question` (cause / effect), although it disambiguates the task.
    _sg("copa", "copa", ("premise", "choice1", "choice2"), ("choice1", "choice2")),
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
    _ALIASES[_t.prefix] = _t.name
    if _t.name in SUPERGLUE_TASKS:
        _ALIASES[f"superglue_{_t.tfds_name.split('/', 1)[1]}"] = _t.name


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
