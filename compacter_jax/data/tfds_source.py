"""The "tfds" source: tensorflow-datasets builders (`glue/rte`, `super_glue/cb`, ...).

Works without TensorFlow (spec §8): the GLUE / SuperGLUE builder modules are imported first
(else "Dataset glue not found"), and prepared data is read through `as_data_source`, which needs
the array_record file format (`tfds build --file_format=array_record`, or `download=True` here,
which prepares in that format). Nothing is downloaded unless `download=True`.

Downloading works without TensorFlow too: TFDS's own builder (URLs, checksums, parsing, the
array_record writer) runs with only the archive extraction done by Python's zipfile/tarfile (TFDS's
extractor needs `tf.io.gfile`), and each host is probed with a short TCP connect first, so an
offline machine gets `DownloadUnavailableError` in seconds instead of minutes of retries.

Most `super_glue` configs cannot even be described without TensorFlow (their `_info` uses
`tf.int32`); for those, already prepared data is opened with `tfds.builder_from_directory`,
which reads the stored `features.json` instead of running the builder code.
"""

from __future__ import annotations

import inspect
import logging
import socket
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from compacter_jax.atomic import atomic_directory
from compacter_jax.data.files import DataError
from compacter_jax.data.tasks import Example, Task, get_task


log = logging.getLogger(__name__)

# Seconds a host has to accept a TCP connection before the network counts as unavailable.
PROBE_TIMEOUT_S = 5.0


class DownloadUnavailableError(DataError):
    """TFDS data are not prepared and cannot be downloaded (no network, host down, refused);
    `reason` is the short cause ("host:port unreachable (...)")."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


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


def probe(url: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raises DownloadUnavailableError unless `url`'s host (or the proxy the environment sets
    for it, as `requests` would use) accepts a TCP connection within `timeout` seconds."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return  # a local path or another scheme: TFDS's own error, if any, says what failed
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_parts.hostname, proxy_parts.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise DownloadUnavailableError(f"{host}:{port} unreachable ({e})") from None


def _map(fn, tree):
    """`fn` over the leaves of a url/path tree (str, dict, list) as TFDS download() takes."""
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return fn(tree)


class _ProbedPythonExtraction:
    """A TFDS DownloadManager whose downloads probe their host first and whose extraction is
    Python's (zipfile, tarfile); everything else is the wrapped manager's."""

    def __init__(self, manager):
        self._manager = manager

    def __getattr__(self, name):
        return getattr(self._manager, name)

    def download(self, url_or_urls):
        _map(lambda url: probe(str(getattr(url, "url", url))), url_or_urls)
        return self._manager.download(url_or_urls)

    def extract(self, path_or_paths):
        return _map(self._extract_one, path_or_paths)

    def download_and_extract(self, url_or_urls):
        return self.extract(self.download(url_or_urls))

    @staticmethod
    def _extract_one(path):
        path = Path(str(path))
        target = path.with_name(path.name + ".extracted")
        if target.is_dir():
            return target
        if not (zipfile.is_zipfile(path) or tarfile.is_tarfile(path)):
            return path  # not an archive (e.g. a plain .tsv download): as is
        with atomic_directory(target) as partial:  # a half-extracted folder is never used
            # zipfile keeps members inside the folder ("../" and absolute names are stripped);
            # tarfile's "data" filter refuses members that point outside it.
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(partial)
            else:
                with tarfile.open(path) as archive:
                    archive.extractall(partial, filter="data")
        return target


def _downloading_builder(builder, data_dir: Path):
    """A copy of `builder` (same name, config, version and data_dir) that downloads through
    `_ProbedPythonExtraction`. Its code_path is set from the original's source file: TFDS finds
    the dataset's recorded URL checksums from it (and its own lookup needs importlib_resources,
    which TFDS does not declare for Python >= 3.9)."""
    original = type(builder)
    from etils import epath

    class Downloading(original, skip_registration=True):
        name = original.name
        code_path = epath.Path(inspect.getfile(original))

        def _split_generators(self, dl_manager, *args, **kwargs):
            return super()._split_generators(_ProbedPythonExtraction(dl_manager), *args,
                                             **kwargs)

    return Downloading(config=builder.builder_config.name, version=str(builder.version),
                       data_dir=str(data_dir),
                       file_format="array_record")


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

    def root(self) -> Path:
        """The TFDS data directory used: `data_dir`, else TFDS's default."""
        tfds = _tfds()
        return Path(self.data_dir or tfds.core.constants.get_default_data_dir()).expanduser()

    def _prepared_dir(self, task: Task) -> Path | None:
        """<data_dir>/<dataset>/<config>/<newest version> holding dataset_info.json, if any."""
        base = self.root().joinpath(*task.tfds_name.split("/"))
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
                f"builder uses tf.int32) and no prepared copy was found under {self.root()}. "
                "Prepare it elsewhere with `tfds build "
                f"{task.tfds_name} --file_format=array_record` and copy it there, or use the "
                "'files' source.") from None

    def prepared(self, task: Task | str) -> bool:
        """Whether `task` is prepared under this source's data directory (no network)."""
        task = get_task(task)
        try:
            return self.builder(task).is_prepared()
        except DataError:
            return False

    def _download(self, task: Task, builder):
        """Downloads and prepares (array_record) `task`; returns a builder that reads it."""
        tfds = _tfds()
        log.info("data: downloading and preparing %s with tensorflow-datasets into %s (once; "
                 "later runs read it there)", task.tfds_name, self.root())
        try:
            _downloading_builder(builder, self.root()).download_and_prepare(
                file_format="array_record",
                # GCS holds TFRecord copies, not array_record: prepare from the source files.
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        except DownloadUnavailableError as e:
            raise DownloadUnavailableError(
                f"{task.tfds_name} is not prepared in {self.root()} and cannot be downloaded "
                f"now: {e}. Connect to the internet and run again, or prepare it elsewhere with "
                f"`tfds build {task.tfds_name} --file_format=array_record` and copy it "
                "there", reason=str(e)) from None
        except (OSError, tfds.download.DownloadError) as e:  # requests errors are OSErrors
            reason = f"download failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            raise DownloadUnavailableError(f"{task.tfds_name}: {reason}", reason) from None
        return self.builder(task)

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
            builder = self._download(task, builder)
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

