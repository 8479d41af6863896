"""The "tfds" source: tensorflow-datasets builders (`glue/rte`, `super_glue/cb`, ...).

Works without TensorFlow (spec §8): the GLUE / SuperGLUE builder modules are imported first
(else "Dataset glue not found"), and prepared data is read through `as_data_source`, which needs
the array_record file format (`tfds build --file_format=array_record`, or `download=True` here,
which prepares in that format). Nothing is downloaded unless `download=True`.

Most `super_glue` configs cannot even be described without TensorFlow (their `_info` uses
`tf.int32`); for those, already prepared data is opened with `tfds.builder_from_directory`,
which reads the stored `features.json` instead of running the builder code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax.data.files import DataError
from compacter_jax.data.tasks import Example, Task, get_task


def _tfds():
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text.glue  # noqa: F401  registers "glue"
    import tensorflow_datasets.text.super_glue  # noqa: F401  registers "super_glue"
    return tfds


def _to_python(value: Any) -> Any:
    """numpy / bytes values of a decoded TFDS example -> str, int, float, list, dict."""
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_to_python(v) for v in value.tolist()] if value.ndim else _to_python(value.item())
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _sort_key(example: Example):
    idx = example.get("idx", 0)
    return tuple(idx[k] for k in sorted(idx)) if isinstance(idx, dict) else (idx,)


class TfdsSource:
    """Loads official splits with tensorflow-datasets.

    Args:
      data_dir: TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
      download: download and prepare (array_record) when the data is not prepared yet.
    """

    name = "tfds"

    def __init__(self, data_dir: str | Path | None = None, download: bool = False):
        self.data_dir = str(Path(data_dir).expanduser()) if data_dir is not None else None
        self.download = download

    def _root(self) -> Path:
        tfds = _tfds()
        return Path(self.data_dir or tfds.core.constants.get_default_data_dir()).expanduser()

    def _prepared_dir(self, task: Task) -> Path | None:
        """<data_dir>/<dataset>/<config>/<newest version> holding dataset_info.json, if any."""
        base = self._root().joinpath(*task.tfds_name.split("/"))
        versions = [p for p in base.glob("*.*.*") if (p / "dataset_info.json").is_file()]
        key = lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split("."))  # noqa: E731
        return max(versions, key=key) if versions else None

    def builder(self, task: Task | str):
        """The TFDS builder of `task`; describes features offline for all GLUE configs."""
        task = get_task(task)
        tfds = _tfds()
        kwargs: dict[str, Any] = {"data_dir": self.data_dir}
        if self.download:
            kwargs["file_format"] = "array_record"
        try:
            return tfds.builder(task.tfds_name, **kwargs)
        except ModuleNotFoundError as e:
            if "tensorflow" not in str(e):
                raise
            prepared = self._prepared_dir(task)
            if prepared is not None:
                return tfds.builder_from_directory(str(prepared))
            raise DataError(
                f"tensorflow-datasets cannot describe {task.tfds_name} without TensorFlow (its "
                f"builder uses tf.int32) and no prepared copy was found under {self._root()}. "
                "Prepare it elsewhere with `tfds build "
                f"{task.tfds_name} --file_format=array_record` and copy it there, or use the "
                "'files' source.") from None

    def label_names(self, task: Task | str) -> tuple[str, ...]:
        """Class names from the builder's features (() for float / answer-list labels)."""
        features = self.builder(task).info.features
        label = features["label"] if "label" in features else None
        return tuple(label.names) if label is not None and hasattr(label, "names") else ()

    def load(self, task: Task | str, split: str) -> list[Example]:
        """All examples of an official split, sorted by `idx`, with str/int/float values."""
        task = get_task(task)
        builder = self.builder(task)
        names = tuple(builder.info.features["label"].names) if task.label_names else ()
        if names != task.label_names:
            raise DataError(
                f"{task.tfds_name}: TFDS label names {list(names)} differ from the registry's "
                f"{list(task.label_names)}; targets would be mislabelled")
        if not builder.is_prepared():
            if not self.download:
                raise DataError(
                    f"{task.tfds_name} is not prepared in {builder.data_dir}; pass download=True "
                    "(config field `download`), run `tfds build "
                    f"{task.tfds_name} --file_format=array_record`, or set `data_dir` to where "
                    "it is prepared")
            builder.download_and_prepare(file_format="array_record")
        if split not in builder.info.splits:
            raise DataError(f"{task.tfds_name} has no split {split!r}; "
                            f"available: {sorted(builder.info.splits)}")
        try:
            source = builder.as_data_source(split=split)
        except (NotImplementedError, ValueError) as e:
            raise DataError(
                f"{task.tfds_name} at {builder.data_dir} cannot be read without TensorFlow "
                f"({e}); prepare it with --file_format=array_record") from None
        n = len(source)
        if n == 0:
            raise DataError(f"{task.tfds_name}: split {split!r} has no examples")
        raw = source.__getitems__(range(n)) if hasattr(source, "__getitems__") else [
            source[i] for i in range(n)]
        examples = [_to_python(dict(ex)) for ex in raw]
        examples.sort(key=_sort_key)  # TFDS stores examples hashed; idx restores file order
        return examples

