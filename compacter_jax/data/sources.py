"""One interface over the data sources: `make_source("files" | "tfds", ...)`.

A source's `load(task, split)` returns the examples of an *official* split ("train",
"validation", "test"; MNLI "validation_matched" / "validation_mismatched") as a list of dicts
with TFDS keys and integer labels (STS-B: float; ReCoRD: `answers`). The paper's
train/validation/test splits are built on top of that by `splitting.paper_splits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from compacter_jax.data.files import DataError, FilesSource
from compacter_jax.data.tasks import Example, Task
from compacter_jax.data.tfds_source import TfdsSource

SOURCE_KINDS = ("files", "tfds")


@runtime_checkable
class Source(Protocol):
    name: str

    def load(self, task: Task | str, split: str) -> list[Example]:
        """Examples of an official split; raises DataError when missing, malformed or empty."""
        ...


def make_source(kind: str = "files", *, data_dir: str | Path | None = None,
                download: bool = False) -> Source:
    """Builds a source.

    Args:
      kind: "files" (local GLUE TSV / SuperGLUE JSONL; `data_dir` defaults to
        `compacter_jax.paths.data_dir()`, i.e. $COMPACTER_DATA_DIR) or "tfds"
        (tensorflow-datasets; `data_dir` is the TFDS data directory).
      download: tfds only — download and prepare missing data (needs network).
    """
    if kind == "files":
        if download:
            raise ValueError("download=True only applies to the 'tfds' source")
        return FilesSource(data_dir)
    if kind == "tfds":
        return TfdsSource(data_dir, download=download)
    raise ValueError(f"unknown data source {kind!r}; valid: {', '.join(SOURCE_KINDS)}")


__all__ = ["DataError", "FilesSource", "SOURCE_KINDS", "Source", "TfdsSource", "make_source"]
