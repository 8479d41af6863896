"""The "files" source: GLUE TSVs and SuperGLUE JSONL files in a local directory.

Layout (the shared data folder; see its SOURCES.md):
  <data_dir>/glue/<TaskDir>/{train,dev,test}.tsv          (MNLI: dev_matched.tsv, dev_mismatched.tsv)
  <data_dir>/glue/WNLI/train_resplit_amrnag/{train,val}.tsv  (used when WNLI/train.tsv is absent)
  <data_dir>/superglue/<Task>/{train,val,test}.jsonl

GLUE quirks handled: TSVs are read by splitting on tabs with no quote handling (rows hold bare
`"`); CoLA train/dev (and the WNLI re-split `val.tsv`) have no header; MRPC starts with a UTF-8
BOM; RTE/QNLI/MNLI labels are words, mapped to TFDS indices. SuperGLUE files may be Hugging Face
`datasets` exports (flat rows, integer labels; BoolQ `answer` bool) or the original SuperGLUE
layout (string/bool labels, WSC `target`, nested MultiRC/ReCoRD), normalised to TFDS keys.
Files must be UTF-8 (a BOM is fine) with '\n' or '\r\n' line ends; STS-B scores must lie in
0–5; JSONL text fields must be strings (not null). Every problem raises `DataError` naming the
file, the line and what is wrong.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import threading
from pathlib import Path
from typing import Any, Mapping

from compacter_jax import paths
from compacter_jax.data.tasks import STSB_SCORE_RANGE, UNLABELLED, Example, Task, get_task

DATA_DIR_HINT = (
    f"set the environment variable {paths.DATA_DIR_ENV} or the config field `data_dir` to the "
    "folder holding glue/<Task>/*.tsv and superglue/<Task>/*.jsonl"
)


class DataError(ValueError):
    """Malformed, missing or empty data; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class _TsvLayout:
    directory: str
    text_columns: Mapping[str, str]  # TFDS key -> TSV header name
    label_column: str
    headerless: tuple[str, ...] | None = None  # column order when a file has no header row


_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2"}
_GLUE: Mapping[str, _TsvLayout] = {
    # CoLA train/dev are the only GLUE files without a header row.
    "cola": _TsvLayout("CoLA", {"sentence": "sentence"}, "label",
                       ("source", "label", "mark", "sentence")),
    "sst2": _TsvLayout("SST-2", {"sentence": "sentence"}, "label"),
    "mrpc": _TsvLayout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "qqp": _TsvLayout("QQP", {"question1": "question1", "question2": "question2"},
                      "is_duplicate"),
    "stsb": _TsvLayout("STS-B", _PAIR, "score"),
    "mnli": _TsvLayout("MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label"),
    "qnli": _TsvLayout("QNLI", {"question": "question", "sentence": "sentence"}, "label"),
    "rte": _TsvLayout("RTE", _PAIR, "label"),
    "wnli": _TsvLayout("WNLI", _PAIR, "label"),
}
_WNLI_RESPLIT_COLUMNS = ("index", "sentence1", "sentence2", "label")  # its val.tsv: no header
_GLUE_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv",
               "validation_matched": "dev_matched.tsv",
               "validation_mismatched": "dev_mismatched.tsv",
               "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}
_SUPERGLUE_DIRS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC",
                   "record": "ReCoRD", "superglue_rte": "RTE", "wic": "WiC", "wsc.fixed": "WSC"}
_SUPERGLUE_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}


def parse_label(value: Any, task: Task, split: str, where: str) -> int | float:
    """Normalises a raw label (int, bool, "0", "entailment", "3.800", ...) to TFDS form.

    Missing labels (None, "", -1) are only accepted in test splits (returned as -1).
    """
    missing = value is None or (isinstance(value, str) and value.strip() == "") or (
        not isinstance(value, bool) and isinstance(value, (int, float)) and value == UNLABELLED)
    if missing:
        if split.startswith("test"):
            return float(UNLABELLED) if task.kind == "regression" else UNLABELLED
        raise DataError(f"{where}: missing label in split {split!r}")
    if task.kind == "regression":
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {value!r} is not a number") from None
        low, high = STSB_SCORE_RANGE
        if not (math.isfinite(score) and low <= score <= high):  # NaN fails every comparison
            raise DataError(f"{where}: {task.name} score {value!r} is outside {low:g}..{high:g}; "
                            "fix the row (scores are similarities from 0 to 5) or drop it")
        return score
    if isinstance(value, bool):
        index = int(value)
    elif isinstance(value, int):
        index = value
    elif isinstance(value, str) and value.strip() in task.label_names:
        index = task.label_names.index(value.strip())
    elif isinstance(value, str) and value.strip().isdigit():
        index = int(value.strip())
    else:
        index = -2  # rejected below
    if not 0 <= index < task.num_classes:
        raise DataError(
            f"{where}: label {value!r} is not a valid {task.name} label "
            f"(expected 0..{task.num_classes - 1} or one of {list(task.label_names)})")
    return index


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data file not found: {path}; {DATA_DIR_HINT}")
    return path


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading BOM dropped), checked for CR-only line ends.

    Raises DataError naming the file, line and byte offset of the first invalid byte.
    """
    data = _require_file(path).read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = data.count(b"\n", 0, offset) + 1
        bad = data[offset:start + e.end].hex(" ")
        raise DataError(
            f"{path}:{line}: byte offset {offset} (0x{bad}): not valid UTF-8 ({e.reason}); "
            "the file must be UTF-8: re-encode it (e.g. `iconv -f latin1 -t utf-8`)") from None
    if "\r" in text and "\n" not in text:
        raise DataError(
            f"{path}: lines end in a bare carriage return ('\\r', old Mac style) and there is no "
            "'\\n'; convert the line endings to '\\n' (e.g. `tr '\\r' '\\n'`)")
    return text


def _read_tsv(path: Path, layout: _TsvLayout, headerless: tuple[str, ...] | None = None
              ) -> list[tuple[int, dict]]:
    """Rows of one TSV as (line number, {column: value}), after header handling and checks.

    A first line naming every text column is the header; otherwise, where the layout allows it,
    the file is headerless with columns `headerless` (default: the layout's).
    """
    headerless = headerless or layout.headerless
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # trailing newline
    if not lines:
        raise DataError(f"{path}: file is empty")
    first = lines[0].rstrip("\r").split("\t")
    start = 1
    if all(col in first for col in layout.text_columns.values()):
        columns = first
    elif headerless is not None and len(first) == len(headerless):
        columns, start = list(headerless), 0
    else:
        raise DataError(f"{path}:1: expected a header naming "
                        f"{sorted(layout.text_columns.values())}, got {first}")
    rows = []
    for lineno, line in enumerate(lines[start:], start=start + 1):
        line = line.rstrip("\r")
        if not line:
            raise DataError(f"{path}:{lineno}: empty line")
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise DataError(
                f"{path}:{lineno}: expected {len(columns)} tab-separated fields "
                f"({', '.join(columns)}), got {len(fields)}")
        rows.append((lineno, dict(zip(columns, fields))))
    return rows


def _glue_examples(rows: list[tuple[int, dict]], task: Task, layout: _TsvLayout, split: str,
                   path: Path) -> list[Example]:
    examples = []
    for n, (lineno, row) in enumerate(rows):
        ex: Example = {key: row[col] for key, col in layout.text_columns.items()}
        if layout.label_column in row:
            ex["label"] = parse_label(row[layout.label_column], task, split, f"{path}:{lineno}")
        elif split.startswith("test"):
            ex["label"] = parse_label(None, task, split, f"{path}:{lineno}")
        else:
            raise DataError(f"{path}: no label column {layout.label_column!r} in split {split!r}")
        ex["idx"] = n  # TFDS numbers the data rows of each file the same way
        examples.append(ex)
    return examples


def _wnli_resplit_train(task: Task, directory: Path) -> list[Example]:
    """Rebuilds the 635-row WNLI train.tsv from a re-split, ordered by its `index` column."""
    layout = _GLUE["wnli"]
    rows = []
    for name in ("train.tsv", "val.tsv"):
        path = directory / "train_resplit_amrnag" / name
        for lineno, row in _read_tsv(path, layout, _WNLI_RESPLIT_COLUMNS):
            try:
                index = int(row["index"])
            except ValueError:
                raise DataError(f"{path}:{lineno}: index {row['index']!r} is not an integer")
            rows.append((index, path, lineno, row))
    rows.sort(key=lambda r: r[0])
    examples = []
    for i, (index, path, lineno, row) in enumerate(rows):
        if i and index == rows[i - 1][0]:
            raise DataError(f"{path}:{lineno}: duplicate WNLI index {index}")
        ex = {key: row[col] for key, col in layout.text_columns.items()}
        ex["label"] = parse_label(row["label"], task, "train", f"{path}:{lineno}")
        ex["idx"] = index
        examples.append(ex)
    return examples


def _flatten_superglue(row: dict, task: Task) -> list[dict]:
    """Original SuperGLUE jsonl layouts -> flat TFDS-style rows (HF exports pass through)."""
    if task.name.startswith("wsc") and isinstance(row.get("target"), dict):
        row = {**row, **row["target"]}
    if task.name == "boolq" and "label" not in row and "answer" in row:
        row = {**row, "label": row["answer"]}  # google/boolq layout
    passage = row.get("passage")
    if task.name == "multirc" and isinstance(passage, dict):
        return [{"paragraph": passage["text"], "question": q["question"], "answer": a["text"],
                 "label": a.get("label"),
                 "idx": {"paragraph": row["idx"], "question": q["idx"], "answer": a["idx"]}}
                for q in passage["questions"] for a in q["answers"]]
    if task.name == "record" and isinstance(passage, dict):
        text = passage["text"]
        entities = sorted({text[e["start"]:e["end"] + 1] for e in passage["entities"]})
        return [{"passage": text, "query": qa["query"], "entities": entities,
                 "answers": sorted({a["text"] for a in qa.get("answers", [])}),
                 "idx": {"passage": row["idx"], "query": qa["idx"]}}
                for qa in row["qas"]]
    return [row]


_JSON_TYPES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
               str: "a string", list: "a list", dict: "an object"}


def _check_field_types(row: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    """Text fields must be strings (a null premise must not become "premise: None"), WSC's
    span indices integers and ReCoRD's entities a list of strings."""
    for key in fields:
        value = row[key]
        kind = _JSON_TYPES.get(type(value), type(value).__name__)
        if key.endswith("_index"):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif key == "entities":
            ok = isinstance(value, list) and all(isinstance(e, str) for e in value)
            want = "a list of strings"
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            raise DataError(f"{where}: field {key!r} is {kind} ({value!r:.60}), expected {want}; "
                            "fix or drop the record")


def _read_jsonl(path: Path, task: Task, split: str) -> list[Example]:
    lines = _read_text(path).split("\n")
    examples: list[Example] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        try:
            flat = _flatten_superglue(raw, task)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed {task.name} record ({e!r})") from None
        for row in flat:
            needed = ("query", "entities", "passage") if task.kind == "span" else task.input_fields
            missing = [k for k in needed if k not in row]
            if missing:
                raise DataError(f"{where}: missing field(s) {missing} (has {sorted(row)})")
            _check_field_types(row, needed, where)
            ex: Example = {k: row[k] for k in needed}
            if task.kind == "span":
                ex["answers"] = list(row.get("answers", []))
                if not all(isinstance(a, str) for a in ex["answers"]):
                    raise DataError(f"{where}: field 'answers' must be a list of strings, "
                                    f"got {ex['answers']!r}; fix the record")
                if not ex["answers"] and not split.startswith("test"):
                    raise DataError(f"{where}: ReCoRD query without answers in split {split!r}")
            else:
                ex["label"] = parse_label(row.get("label"), task, split, where)
            ex["idx"] = row.get("idx", len(examples))
            examples.append(ex)
    return examples


class FilesSource:
    """Reads tasks from local files; results are cached per (task, split) — do not mutate them."""

    name = "files"

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir).expanduser() if data_dir is not None else paths.data_dir()
        self._cache: dict[tuple[str, str], list[Example]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def is_files_layout(data_dir: str | Path) -> bool:
        """Whether `data_dir` holds `glue/` or `superglue/`, or is such a folder itself."""
        d = Path(data_dir).expanduser()
        return (any((d / kind).is_dir() for kind in ("glue", "superglue"))
                or d.name.lower() in ("glue", "superglue") and d.is_dir())

    def holds(self, task: Task | str) -> bool:
        """Whether the task's training file is here (WNLI: or its re-split folder); the
        other splits' files are checked when they are loaded."""
        path = self.path(task, "train")
        return path.is_file() or (get_task(task).name == "wnli"
                                  and (path.parent / "train_resplit_amrnag").is_dir())

    def _root(self, kind: str) -> Path:
        """The `glue/` or `superglue/` folder: under data_dir, or data_dir itself when it is
        that folder (e.g. --config.data_dir=.../glue)."""
        if self.data_dir.name.lower() == kind and not (self.data_dir / kind).is_dir():
            return self.data_dir
        return self.data_dir / kind

    def path(self, task: Task | str, split: str) -> Path:
        """The file holding `split` of `task` (for WNLI train: the re-split folder if needed)."""
        task = get_task(task)
        if task.name in _GLUE:
            if split not in _GLUE_FILES:
                raise DataError(f"unknown split {split!r} for {task.name}; "
                                f"known: {sorted(_GLUE_FILES)}")
            return self._root("glue") / _GLUE[task.name].directory / _GLUE_FILES[split]
        if split not in _SUPERGLUE_FILES:
            raise DataError(f"unknown split {split!r} for {task.name}; "
                            f"known: {sorted(_SUPERGLUE_FILES)}")
        return self._root("superglue") / _SUPERGLUE_DIRS[task.name] / _SUPERGLUE_FILES[split]

    def load(self, task: Task | str, split: str) -> list[Example]:
        """All examples of an official split ("train", "validation", "test", MNLI's
        "validation_matched" / "validation_mismatched") as TFDS-style dicts."""
        task = get_task(task)
        key = (task.name, split)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._load(task, split)
            return list(self._cache[key])

    def _load(self, task: Task, split: str) -> list[Example]:
        if not self.data_dir.is_dir():
            raise DataError(f"data directory not found: {self.data_dir}; {DATA_DIR_HINT}")
        path = self.path(task, split)
        if task.name in _GLUE:
            layout = _GLUE[task.name]
            if task.name == "wnli" and split == "train" and not path.is_file() and (
                    path.parent / "train_resplit_amrnag").is_dir():
                examples = _wnli_resplit_train(task, path.parent)
            else:
                examples = _glue_examples(_read_tsv(path, layout), task, layout,
                                          split, path)
        else:
            examples = _read_jsonl(path, task, split)
        if not examples:
            raise DataError(f"{path}: split {split!r} of {task.name} has no examples")
        return examples
