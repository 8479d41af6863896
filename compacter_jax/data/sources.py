"""One interface over the data sources: `make_source("files" | "tfds" | "auto", ...)`.

"auto" is what a user wants by default: the local files where they hold the task, else
tensorflow-datasets (prepared already, or downloaded and prepared once when the network
answers), else one error naming both ways to get the data.

A source's `load(task, split)` returns the examples of an *official* split ("train",
"validation", "test"; MNLI "validation_matched" / "validation_mismatched") as a list of dicts
with TFDS keys and integer labels (STS-B: float; ReCoRD: `answers`). The paper's
train/validation/test splits are built on top of that by `splitting.paper_splits`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

from compacter_jax.data.files import DATA_DIR_HINT, DataError, FilesSource
from compacter_jax.data.tasks import Example, Task, get_task
from compacter_jax.data.tfds_source import DownloadUnavailableError, TfdsSource

log = logging.getLogger(__name__)
SOURCE_KINDS = ("files", "tfds", "auto")


@runtime_checkable
class Source(Protocol):
    name: str

    def load(self, task: Task | str, split: str) -> list[Example]:
        """Examples of an official split; raises DataError when missing, malformed or empty."""
        ...


class AutoSource:
    """Per task: local files when they hold it, else TFDS (downloading when allowed).

    Args:
      data_dir: the one folder to look in and download to: the files' root (glue/<Task>/...)
        and the TFDS data directory (glue/<config>/<version>/...; the two layouts do not
        collide). None: $COMPACTER_DATA_DIR for files and TFDS's default ($TFDS_DATA_DIR or
        ~/tensorflow_datasets).
      download: whether TFDS may download and prepare a task found in neither.
    """

    name = "auto"

    def __init__(self, data_dir: str | Path | None = None, download: bool = True):
        self.files = FilesSource(data_dir)
        self.tfds = TfdsSource(data_dir, download=download)
        self._chosen: dict[str, Source] = {}

    def source_for(self, task: Task | str) -> Source:
        """The source `task` is read from (decided once per task, without network)."""
        task = get_task(task)
        if task.name not in self._chosen:
            if self.files.holds(task):
                chosen: Source = self.files
            else:
                chosen = self.tfds
            log.info("data: %s from %s", task.name, "local files in %s" % self.files.data_dir
                     if chosen is self.files else "tensorflow-datasets (%s)" % task.tfds_name)
            self._chosen[task.name] = chosen
        return self._chosen[task.name]

    def load(self, task: Task | str, split: str) -> list[Example]:
        task = get_task(task)
        source = self.source_for(task)
        if source is self.files:
            return source.load(task, split)
        try:
            return source.load(task, split)
        except DataError as e:
            if self.tfds.prepared(task) and not isinstance(e, DownloadUnavailableError):
                raise  # prepared data that is wrong: its own error names it
            missing = self.files.path(task, "train")
            how = ("with internet, run again to download it, or prepare it with `tfds build "
                   f"{task.tfds_name} --file_format=array_record --data_dir={self.tfds.root()}`"
                   if self.tfds.download else
                   "allow the download (config field `download`), or prepare it with `tfds "
                   f"build {task.tfds_name} --file_format=array_record --data_dir="
                   f"{self.tfds.root()}`")
            benchmark = "GLUE" if task.tfds_name.startswith("glue/") else "SuperGLUE"
            why = e.reason if isinstance(e, DownloadUnavailableError) else str(e)
            raise DataError(
                f"no data for {task.name}: no local file {missing}, and tensorflow-datasets "
                f"has no {task.tfds_name} ({why}). Either put the {benchmark} files there "
                f"({DATA_DIR_HINT}), or {how}") from None


def make_source(kind: str = "files", *, data_dir: str | Path | None = None,
                download: bool | None = None) -> Source:
    """Builds a source.

    Args:
      kind: "files" (local GLUE TSV / SuperGLUE JSONL; `data_dir` defaults to
        `compacter_jax.paths.data_dir()`, i.e. $COMPACTER_DATA_DIR), "tfds"
        (tensorflow-datasets; `data_dir` is the TFDS data directory) or "auto" (`AutoSource`:
        files where they hold the task, else TFDS).
      download: whether TFDS may download and prepare missing data (needs network). None:
        the kind's default (tfds: no, as `TfdsSource`; auto: yes); files: must not be True.
    """
    if kind == "files":
        if download:
            raise ValueError("download=True only applies to the 'tfds' and 'auto' sources")
        return FilesSource(data_dir)
    if kind == "tfds":
        return TfdsSource(data_dir, download=bool(download))
    if kind == "auto":
        return AutoSource(data_dir, download=True if download is None else download)
    raise ValueError(f"unknown data source {kind!r}; valid: {', '.join(SOURCE_KINDS)}")


__all__ = ["AutoSource", "DataError", "DownloadUnavailableError", "FilesSource", "SOURCE_KINDS",
           "Source", "TfdsSource", "make_source"]
