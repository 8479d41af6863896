"""The settings that locate local files: $COMPACTER_DATA_DIR (the shared data, default
../shared/data) and $COMPACTER_CHECKPOINTS_DIR (backbones pretrained here, default the package
data folder compacter_jax/checkpoints); and `inside`, which keeps a model's files in its folder."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "COMPACTER_DATA_DIR"


def data_dir() -> Path:
    """Root of the local GLUE/SuperGLUE files and the T5 vocabulary (may not exist)."""
    default = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return Path(os.environ.get(DATA_DIR_ENV, default)).expanduser().resolve()


def t5_vocab_dir() -> Path:
    """Directory holding the real T5 `spiece.model`."""
    return data_dir() / "t5_vocab"


CHECKPOINTS_DIR_ENV = "COMPACTER_CHECKPOINTS_DIR"


def checkpoints_dir() -> Path:
    """Where the backbones pretrained in this project live, each usable by its folder name
    (`from_pretrained("t5-mini-glue")`): $COMPACTER_CHECKPOINTS_DIR, else the package data
    folder `compacter_jax/checkpoints` (in a source checkout a symlink to the repository's
    `checkpoints/`; an installed package holds a copy), else the repository's `checkpoints/`
    (a checkout where the symlink did not survive, e.g. git on Windows)."""
    if os.environ.get(CHECKPOINTS_DIR_ENV):
        return Path(os.environ[CHECKPOINTS_DIR_ENV]).expanduser().resolve()
    here = Path(__file__).resolve().parent
    for candidate in (here / "checkpoints", here.parent / "checkpoints"):
        if candidate.is_dir():
            return candidate.resolve()
    return (here / "checkpoints").resolve()


def shipped_checkpoint(name: str) -> Path | None:
    """`checkpoints_dir()/name` when `name` is a plain folder name holding config.json there."""
    if not name or "/" in name or name.startswith((".", "~")):
        return None
    folder = checkpoints_dir() / name
    return folder if (folder / "config.json").is_file() else None


def locate(name: str | os.PathLike) -> tuple[str, Path | str]:
    """Where a model or tokenizer given by name lives (the `random:` prefix is parsed above
    this, by `compacter_jax.models.config.parse_model_spec`).

    Returns:
      ("path", Path) for a path that exists or is written as one ("./x", "/x", "~/x"; it may
      still be a file or missing: the loader says so), else ("shipped", Path) for a backbone
      shipped with the package (`shipped_checkpoint`), else ("hub", name): a Hub repo id or
      short name (e.g. "t5-base").
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if path.exists() or text.startswith((".", "/", "~")):
        return "path", path
    if (shipped := shipped_checkpoint(text)) is not None:
        return "shipped", shipped
    return "hub", text


def inside(directory: Path, name: str, what: str) -> Path:
    """`directory/name`, refusing a name or a symlink that leads out of `directory`.

    A model folder is untrusted input: a file named by its index or a symlink in it must not
    read elsewhere. Files of a Hugging Face cache snapshot are symlinks into the repo's
    `blobs/` folder; those are inside too.

    Args:
      directory: the model (or tokenizer) folder.
      name: a relative '/'-separated path, as a file of the folder names it.
      what: the file that names it, for the error.
    Raises:
      ValueError naming `what`, the name and the folder.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or not name or "\\" in name or name.startswith("/") or ":" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"{what} names {name!r}: the files of a model must be plain relative "
                         f"paths inside its folder {directory}")
    path = directory.joinpath(*parts)
    real = path.resolve()
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":  # HF cache: snapshots/<commit>/f -> ../../blobs/x
        roots.append((directory.parent.parent / "blobs").resolve())
    if not any(real == root or root in real.parents for root in roots):
        raise ValueError(f"{path} (named by {what}) leads to {real}, outside the model folder "
                         f"{directory}: refusing to read it")
    return path
