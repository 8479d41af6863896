"""The one setting that locates the shared data: $COMPACTER_DATA_DIR (default ../shared/data)."""

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
