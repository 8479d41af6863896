"""source="auto" as a user gets it: local files where they hold the task; else TFDS downloads
and prepares it (array_record) from the dataset's URL, here a GLUE zip served on 127.0.0.1,
and later runs read the prepared copy with no network; offline with neither, one error names
both ways. No host but 127.0.0.1 is ever contacted (the TFDS URL is redirected to it)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

tfds_glue = pytest.importorskip("tensorflow_datasets.text.glue")

from compacter_jax.data import (AutoSource, DataError, DownloadUnavailableError,  # noqa: E402
                                FilesSource, TfdsSource, make_source)
from compacter_jax.data import tfds_source  # noqa: E402

# SST-2 as GLUE ships it (SST-2.zip: SST-2/{train,dev,test}.tsv), a bare quote included.
TRAIN = [("a gripping , funny film ", 1), ("the plot is \" thin ", 0), ("dull and long ", 0)]
DEV = [("a triumph ", 1), ("nothing works ", 0)]


def _tsv(rows):
    return "sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows)


def _examples(rows):
    return [{"idx": i, "label": y, "sentence": s} for i, (s, y) in enumerate(rows)]


@pytest.fixture(autouse=True)
def only_localhost(monkeypatch):
    """Any connection or name lookup beyond 127.0.0.1 fails the test; no proxy is used."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"connection to {address} attempted")
        return connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", None):
            raise AssertionError(f"name lookup of {host!r} attempted")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture
def glue_server(tmp_path, monkeypatch):
    """Serves SST-2.zip on 127.0.0.1 and points TFDS's glue/sst2 URL at it."""
    root = tmp_path / "server"
    root.mkdir()
    with zipfile.ZipFile(root / "SST-2.zip", "w") as archive:
        archive.writestr("SST-2/train.tsv", _tsv(TRAIN))
        archive.writestr("SST-2/dev.tsv", _tsv(DEV))
        archive.writestr("SST-2/test.tsv", "index\tsentence\n0\tan unlabelled line \n")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    monkeypatch.setattr(tfds_glue.Glue.builder_configs["sst2"], "data_url",
                        f"http://127.0.0.1:{server.server_port}/SST-2.zip")
    served = SimpleNamespace(requests=requests, server=server)
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port_url(monkeypatch):
    """Points glue/sst2's URL at a 127.0.0.1 port nobody listens on: an offline machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(tfds_glue.Glue.builder_configs["sst2"], "data_url",
                        f"http://127.0.0.1:{port}/SST-2.zip")


def test_auto_downloads_prepares_and_then_reads_offline(tmp_path, glue_server, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    source = make_source("auto", data_dir=data_dir)   # download: the default, allowed
    assert isinstance(source, AutoSource) and source.source_for("sst2") is source.tfds
    assert source.load("sst2", "train") == _examples(TRAIN)
    assert source.load("sst2", "validation") == _examples(DEV)
    assert glue_server.requests == ["/SST-2.zip"]      # downloaded once, for every split
    assert (data_dir / "glue" / "sst2" / "2.0.0" / "dataset_info.json").is_file()

    # A second run: the prepared copy, with the server gone and any connection refused.
    glue_server.server.shutdown()
    glue_server.server.server_close()

    def no_network(*args, **kwargs):
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    again = AutoSource(data_dir)
    assert again.load("sst2", "train") == _examples(TRAIN)
    assert again.load("sst2", "validation") == _examples(DEV)
    assert glue_server.requests == ["/SST-2.zip"]


def test_the_experiments_default_config_downloads(tmp_path, glue_server):
    from experiments import finetune
    from experiments.configs.glue import get_config

    config = get_config()
    config.data_dir = str(tmp_path)
    assert config.source == "auto" and config.download is None   # the defaults
    assert finetune.resolve_source(config).load("sst2", "train") == _examples(TRAIN)
    config.download = False
    assert not finetune.resolve_source(config).tfds.download


def test_local_files_that_hold_the_task_win(tmp_path, glue_server):
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "train.tsv").write_text(_tsv(DEV))
    source = AutoSource(tmp_path)
    assert source.source_for("sst2") is source.files
    assert source.load("sst2", "train") == _examples(DEV)
    assert glue_server.requests == []
    # A task the files do not hold goes to TFDS (here: refused, no download allowed).
    with pytest.raises(DataError, match="no data for rte"):
        AutoSource(tmp_path, download=False).load("rte", "train")


def test_the_shared_files_are_used_unchanged(shared_data, glue_server):
    source = make_source("auto")                      # $COMPACTER_DATA_DIR, no data_dir
    assert source.source_for("sst2") is source.files
    assert source.load("sst2", "validation") == FilesSource(shared_data).load("sst2",
                                                                              "validation")
    assert glue_server.requests == []


def test_offline_with_neither_is_one_error_naming_both_ways(tmp_path, monkeypatch):
    _closed_port_url(monkeypatch)
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        AutoSource(tmp_path).load("sst2", "train")
    assert time.monotonic() - start < tfds_source.PROBE_TIMEOUT_S   # refused: no retry loop
    message = str(info.value)
    assert str(tmp_path / "glue" / "SST-2" / "train.tsv") in message   # the local way
    assert f"tfds build glue/sst2 --file_format=array_record --data_dir={tmp_path}" in message
    assert "unreachable" in message and "COMPACTER_DATA_DIR" in message
    assert not (tmp_path / "glue" / "sst2" / "2.0.0").exists()          # nothing half-made
    assert not list((tmp_path / "glue" / "sst2").glob("incomplete*"))
    # The tfds source alone says why it cannot download.
    with pytest.raises(DownloadUnavailableError, match="cannot be downloaded now"):
        TfdsSource(tmp_path, download=True).load("sst2", "train")
    # Download not allowed: the error says how to allow it, and nothing is contacted.
    with pytest.raises(DataError, match="allow the download .config field `download`."):
        AutoSource(tmp_path, download=False).load("sst2", "train")


def test_the_probe_goes_through_the_proxy_the_environment_sets(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                       # closed again: nobody listens
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(DownloadUnavailableError, match=f"127.0.0.1:{port} unreachable"):
        tfds_source.probe("https://dl.fbaipublicfiles.com/glue/data/SST-2.zip")
    tfds_source.probe("/a/local/file.zip")              # not a network URL: nothing to probe


def test_extraction_is_all_or_nothing(tmp_path, monkeypatch):
    """A failed extraction leaves neither a half folder that a re-run would trust nor a
    temporary; the re-run extracts the whole archive."""
    from compacter_jax import atomic

    with zipfile.ZipFile(tmp_path / "RTE.zip", "w") as archive:
        archive.writestr("RTE/train.tsv", "index\tsentence1\n")
        archive.writestr("RTE/dev.tsv", "index\tsentence1\n")
    extract = tfds_source._ProbedPythonExtraction._extract_one

    def killed(self, path, *_, **__):
        (Path(path) / "RTE").mkdir()
        raise KeyboardInterrupt                                 # after a first member

    monkeypatch.setattr(zipfile.ZipFile, "extractall", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(tmp_path / "RTE.zip")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RTE.zip"]
    target = extract(tmp_path / "RTE.zip")
    assert target == tmp_path / "RTE.zip.extracted"
    assert sorted(p.name for p in (target / "RTE").iterdir()) == ["dev.tsv", "train.tsv"]
    assert not [p for p in tmp_path.iterdir() if atomic.is_temporary(p)]
    (tmp_path / "plain.tsv").write_text("a\tb\n")
    assert extract(tmp_path / "plain.tsv") == tmp_path / "plain.tsv"  # not an archive: as is
