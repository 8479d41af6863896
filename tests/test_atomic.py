"""compacter_jax.atomic: all-or-nothing files and folders, recognisable temporaries."""

import os
from pathlib import Path

import pytest

from compacter_jax import atomic


def test_file_replaced_whole_and_mode_like_open(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic.atomic_write(target, "new")
    assert target.read_text() == "new"
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    atomic.atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"\x00\x01"))
    assert target.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir() if atomic.is_temporary(p)] == []


def test_failed_write_keeps_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.atomic_write(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_bad_targets_name_the_path(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="d is a folder"):
        atomic.atomic_write(tmp_path / "d", "x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.atomic_write(tmp_path / "missing" / "f", "x")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="f is a file"):
        with atomic.atomic_directory(tmp_path / "f"):
            pass


def test_directory_replaced_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic.atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_remove_temporaries_only_removes_ours(tmp_path):
    left = tmp_path / f".a.json.{os.getpid()}.0123abcd.tmp"
    left.write_text("half")
    folder = tmp_path / f".export.{os.getpid()}.89abcdef.old"
    folder.mkdir()
    keep = [tmp_path / ".hidden", tmp_path / "a.tmp", tmp_path / "a.json"]
    for p in keep:
        p.write_text("keep")
    removed = atomic.remove_temporaries(tmp_path)
    assert sorted(removed) == sorted([left, folder])
    assert all(p.exists() for p in keep)
