"""Atomic writes: a file or a folder is either the old one or the complete new one, never half.

Every writer in the package goes through here, so a killed run leaves only temporaries whose
names `is_temporary` recognises (`.NAME.PID.HEX.tmp`, and `.NAME.PID.HEX.old` for a folder
being replaced), and `remove_temporaries` can clear them without knowing who wrote them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import os
from pathlib import Path
import re
import secrets
import shutil

_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.(tmp|old)$")


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether `path` is a temporary left by `atomic_write` / `atomic_directory`."""
    return bool(_TEMPORARY.match(Path(path).name))


def _check_target(target: Path, want_dir: bool) -> None:
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{target}: its folder {target.parent} does not exist; create it "
                                "or choose another path")
    if target.is_dir() and not want_dir:
        raise IsADirectoryError(f"{target} is a folder, but a file is to be written there; give "
                                "a file's path or move the folder")
    if target.exists() and not target.is_dir() and want_dir:
        raise NotADirectoryError(f"{target} is a file, but a folder is to be written there; give "
                                 "another path or move the file")
    if not os.access(target.parent, os.W_OK):
        raise PermissionError(f"{target}: its folder {target.parent} is not writable; fix its "
                              "permissions or choose another path")


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], None],
                 *, encoding: str = "utf-8") -> Path:
    """Writes a file so that readers see the old file or the whole new one.

    Args:
      path: the file to (re)place. Its folder must exist; a folder at `path` is an error.
      content: the text (written as `encoding`) or bytes, or `write(tmp_path)` that writes the
        file itself (e.g. safetensors' `save_file`).
      encoding: for text content.

    Returns:
      `path` as a `Path`. The file gets the mode a plain `open()` gives (0o666 minus the umask),
      not the 0600 that `mkstemp` and some writers use.
    """
    target = Path(path)
    _check_target(target, want_dir=False)
    tmp = _sibling(target, "tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode & 0o777  # what the umask made of 0o666
    try:
        if callable(content):
            content(tmp)
        else:
            data = content.encode(encoding) if isinstance(content, str) else bytes(content)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder; on a clean exit it replaces `path` as a whole.

    The previous folder (if any) stays in place until the new one is complete; on an error the
    temporary folder is removed and `path` is untouched.
    """
    target = Path(path)
    _check_target(target, want_dir=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = _sibling(target, "old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Deletes the temporaries a killed writer left in `folder`. Call only while no other
    process writes there (e.g. holding the workdir lock). Returns what was removed."""
    folder = Path(folder)
    candidates = folder.rglob(".*") if recursive else folder.glob(".*")
    found = sorted(p for p in candidates if is_temporary(p))
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() \
            else p.unlink(missing_ok=True)
    return found
