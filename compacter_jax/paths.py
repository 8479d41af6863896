"""The settings that locate local files: $COMPACTER_DATA_DIR (the shared data, default
../shared/data) and $COMPACTER_CHECKPOINTS_DIR (backbones pretrained here, default checkpoints/)."""

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
    (`from_pretrained("t5-mini-glue")`): $COMPACTER_CHECKPOINTS_DIR, default the repository's
    `checkpoints/`."""
    default = Path(__file__).resolve().parent.parent / "checkpoints"
    return Path(os.environ.get(CHECKPOINTS_DIR_ENV, default)).expanduser().resolve()


def shipped_checkpoint(name: str) -> Path | None:
    """`checkpoints_dir()/name` when `name` is a plain folder name holding config.json there."""
    if not name or "/" in name or name.startswith((".", "~")):
        return None
    folder = checkpoints_dir() / name
    return folder if (folder / "config.json").is_file() else None
