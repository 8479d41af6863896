"""Hugging Face Hub look-ups as `transformers` users expect them.

A repo is downloaded on first use into the HF cache (`$HF_HOME/hub`, or `$HF_HUB_CACHE`),
with huggingface_hub's own progress bars, at the `revision` asked for (branch, tag or commit
hash; default "main"). Under `HF_HUB_OFFLINE=1` (read at call time, not only at import) or
`local_files_only=True` nothing touches the network: the cache answers or the call fails.

Every failure is one line naming the repo and the cause, as one of three exceptions:

* `HubUnreachableError` (a FileNotFoundError): offline mode, `local_files_only`, or no
  connection to the Hub, and the files are not in the cache. The only case where a caller
  may fall back to something else.
* `HubNotFoundError` (a FileNotFoundError): no such repo, revision or file.
* `HubAccessError` (a PermissionError): a gated or private repo without a valid token.

Only the files a T5 needs are fetched (`MODEL_FILES`): never pickled PyTorch weights.
"""

from __future__ import annotations

import os
from pathlib import Path

# config.json, safetensors weights (single file or shards + index) and the tokenizer files.
MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "spiece.model",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json")
_TRUE = {"1", "on", "yes", "true"}

# Hub repositories of the short names (`from_pretrained("t5-base")` downloads google-t5/t5-base).
HUB_IDS: dict[str, str] = {
    "t5-small": "google-t5/t5-small",
    "t5-base": "google-t5/t5-base",
    "t5-large": "google-t5/t5-large",
    "t5-v1_1-small": "google/t5-v1_1-small",
    "t5-v1_1-base": "google/t5-v1_1-base",
    "flan-t5-small": "google/flan-t5-small",
    "flan-t5-base": "google/flan-t5-base",
}


def repo_id_of(name: str) -> str:
    """The Hub repo of a model name: a short name of `HUB_IDS`, else the name itself."""
    return HUB_IDS.get(name, name)


class HubUnreachableError(FileNotFoundError):
    """The Hub cannot be reached (offline mode, local_files_only, no connection) and the
    files are not in the local cache."""


class HubNotFoundError(FileNotFoundError):
    """The repo, the revision or a file does not exist on the Hub."""


class HubAccessError(PermissionError):
    """A gated or private repo that the current token (if any) may not read."""


def is_offline() -> bool:
    """True under HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1), read from the environment now
    when set there, else huggingface_hub's setting (read when it was imported)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var):
            return os.environ[var].strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def snapshot(repo_id: str, *, revision: str | None = None, local_files_only: bool = False,
             allow_patterns: tuple[str, ...] = MODEL_FILES) -> Path:
    """The local folder of `repo_id` at `revision` holding the files matching
    `allow_patterns`, downloaded into the HF cache when missing (unless offline).

    Raises:
      HubUnreachableError, HubNotFoundError, HubAccessError: one line naming the repo and why.
      ValueError: `repo_id` is not a valid Hub repo id.
    """
    from huggingface_hub import snapshot_download

    offline = local_files_only or is_offline()
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                      allow_patterns=list(allow_patterns)))
    except Exception as e:  # noqa: BLE001 - translated below, re-raised when unknown
        _reraise(e, repo_id, revision, None, offline, local_files_only)


def file(repo_id: str, filename: str, *, revision: str | None = None,
         local_files_only: bool = False) -> Path:
    """The local path of one file of `repo_id`, downloaded into the HF cache when missing.
    Raises as `snapshot`."""
    from huggingface_hub import hf_hub_download

    offline = local_files_only or is_offline()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision,
                                    local_files_only=offline))
    except Exception as e:  # noqa: BLE001
        _reraise(e, repo_id, revision, filename, offline, local_files_only)


def _reraise(error: Exception, *args) -> None:
    translated = _translate(error, *args)
    if translated is error:
        raise error
    raise translated from error


def _translate(error: Exception, repo_id: str, revision: str | None, filename: str | None,
               offline: bool, local_files_only: bool) -> Exception:
    """huggingface_hub's exception -> one of ours, with a one-line message."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    rev = revision or "main"
    what = f"{filename!r} of " if filename else ""
    where = f"{what}Hub model {repo_id!r} (revision {rev})"
    if isinstance(error, HFValidationError):
        return ValueError(f"{repo_id!r} is neither a local directory nor a valid Hub repo id "
                          f"(org/name): {_first_line(error)}")
    if isinstance(error, GatedRepoError):
        return HubAccessError(f"{where} is gated: accept its conditions on "
                              f"{constants.ENDPOINT}/{repo_id} and log in (`hf auth login` or "
                              "HF_TOKEN)")
    if isinstance(error, RevisionNotFoundError):
        return HubNotFoundError(f"{where}: revision {rev!r} not found (a branch, tag or "
                                "commit hash of the repo)")
    if isinstance(error, RepositoryNotFoundError):
        return HubNotFoundError(f"{where}: no such model repo on {constants.ENDPOINT} and no "
                                f"local directory {repo_id!r} (a private repo needs a login: "
                                "`hf auth login` or HF_TOKEN)")
    if isinstance(error, RemoteEntryNotFoundError):
        return HubNotFoundError(f"{where} has no file {filename!r}")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return HubAccessError(f"{where}: access denied (HTTP {status}); log in with "
                              "`hf auth login` or set HF_TOKEN")
    if isinstance(error, (LocalEntryNotFoundError, httpx2.TransportError)):
        cache = constants.HF_HUB_CACHE  # what the client used (read when it was imported)
        if local_files_only:
            why = "local_files_only=True forbids downloading it"
        elif offline:
            why = "HF_HUB_OFFLINE=1 forbids downloading it (unset it on a machine with internet)"
        else:
            cause = error.__cause__ or error.__context__ or error
            why = (f"the Hub at {constants.ENDPOINT} cannot be reached "
                   f"({type(cause).__name__}: {_first_line(cause)})")
        return HubUnreachableError(
            f"{where} is not in the local HF cache {cache} (or only partly) and {why}; on a "
            f"machine with internet `hf download {repo_id}` fills the cache (shared via HF_HOME)")
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
