"""A fake Hugging Face Hub on 127.0.0.1 for tests: the HTTP file API that `huggingface_hub`'s
`snapshot_download` / `hf_hub_download` (2.x) call, so the real client downloads from it.

Served, for each repo (read from huggingface_hub's hf_api.py / file_download.py):

* `GET /api/models/<repo>` and `/api/models/<repo>/revision/<rev>`: the repo info (`sha`).
* `GET /api/models/<repo>/tree/<rev>?recursive=..`: the file listing (path, size, oid).
* `HEAD`/`GET /<repo>/resolve/<rev>/<file>`: the file, with `X-Repo-Commit`, `ETag` and
  `Content-Length`.

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its exception types. Every request is recorded
in `FakeHub.requests`.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Mapping

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one commit of every repo


class FakeHub:
    """Serves `repos` ({repo id: {file name: bytes}}) at `self.endpoint` until `close()`;
    repos in `gated` answer 401 GatedRepo. Also a context manager."""

    def __init__(self, repos: Mapping[str, Mapping[str, bytes]], gated: tuple[str, ...] = ()):
        self.repos = {r: dict(files) for r, files in repos.items()}
        self.gated = set(gated)
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 - http.server's naming
                hub._answer(self, body=False)

            def do_GET(self):  # noqa: N802
                hub._answer(self, body=True)

            def log_message(self, *args):  # quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- routing ---------------------------------------------------------------------------
    def _repo_of(self, parts: list[str]) -> tuple[str | None, list[str]]:
        for n in (2, 1):  # "org/name" or a legacy "name"
            repo = "/".join(parts[:n])
            if repo in self.repos or repo in self.gated:
                return repo, parts[n:]
        return None, parts[2:]

    def _answer(self, handler, body: bool) -> None:
        url = urllib.parse.urlsplit(handler.path)
        self.requests.append(f"{handler.command} {url.path}")
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        api = parts[:2] == ["api", "models"]
        repo, rest = self._repo_of(parts[2:] if api else parts)
        if repo is None:
            return self._error(handler, 404, "RepoNotFound", "Repository not found")
        if repo in self.gated:
            return self._error(handler, 401, "GatedRepo", "Access to this repo is restricted")
        files = self.repos[repo]
        if api:
            rev = rest[1] if rest[:1] in (["revision"], ["tree"]) and len(rest) > 1 else "main"
            if rev not in ("main", COMMIT):
                return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
            if rest[:1] == ["tree"]:
                listing = [{"type": "file", "path": name, "size": len(data),
                            "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()]
                return self._send(handler, json.dumps(listing).encode(), body,
                                  {"Content-Type": "application/json"})
            info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                    "siblings": [{"rfilename": name} for name in files]}
            return self._send(handler, json.dumps(info).encode(), body,
                              {"Content-Type": "application/json"})
        if len(rest) < 3 or rest[0] != "resolve":
            return self._error(handler, 404, "EntryNotFound", "Not a file URL")
        rev, name = rest[1], "/".join(rest[2:])
        if rev not in ("main", COMMIT):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        if name not in files:
            return self._error(handler, 404, "EntryNotFound", "Entry not found",
                               {"X-Repo-Commit": COMMIT})
        data = files[name]
        return self._send(handler, data, body, {
            "X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Type": "application/octet-stream"})

    @staticmethod
    def _send(handler, data: bytes, body: bool, headers: dict[str, str]) -> None:
        handler.send_response(200)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    @staticmethod
    def _error(handler, status: int, code: str, message: str,
               headers: dict[str, str] | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)


def tiny_t5_files(spiece_model: bytes, seed: int = 0, **sizes) -> dict[str, bytes]:
    """A small random T5 repo: config.json, model.safetensors and `spiece_model` (vocab_size
    32,128 as T5's, so any T5 tokenizer fits). Returns {file name: bytes}."""
    import tempfile
    from pathlib import Path

    import jax
    import numpy as np

    from compacter_jax.models import T5Config, T5ForConditionalGeneration, save_pretrained
    from compacter_jax.models.hf_io import param_shapes

    config = T5Config(**{**dict(d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                num_decoder_layers=1, num_heads=2), **sizes})
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32),
        param_shapes(T5ForConditionalGeneration(config)))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(tmp, config, params)
        files = {name: (Path(tmp) / name).read_bytes()
                 for name in ("config.json", "model.safetensors")}
    return {**files, "spiece.model": spiece_model}


def point_client_at(monkeypatch, endpoint: str, hf_home, *, offline: bool) -> None:
    """Points this process's huggingface_hub at `endpoint` with an empty cache under `hf_home`
    (the client reads these settings when imported: its constants are patched as well as the
    environment a subprocess would read)."""
    import os

    from huggingface_hub import constants

    hub_cache = os.path.join(str(hf_home), "hub")
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": hub_cache,
           "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", os.path.join(str(hf_home), "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
