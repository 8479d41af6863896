"""One run per workdir, outputs checked up front, and a resume that matches what it resumes.

    check_writable(workdir)                        # before any work: exit 2 on a bad workdir
    with WorkdirLock(workdir, force=config.force_unlock):
        remove_stale_temporaries(workdir)          # left by a killed run
        check_resume_config(workdir, config.to_dict(), allow_change=...)
        ...                                        # train, evaluate, write outputs

`WorkdirLock` is an exclusive `flock` on `WORKDIR/.lock` plus a record of the holder (pid,
host, start time, command). A second run on the workdir is refused while the first lives. A
lock left by a dead process on this host is stale and taken over; one recorded by another host
cannot be checked from here and is only taken over with `force=True`
(`--config.force_unlock=True`).

`check_resume_config` keeps the run's config in `WORKDIR/run_config.json`. When the workdir
holds something to resume (checkpoints or a summary), a new config must match it: `task`,
`method`, `model` and `peft.*` never change within a workdir; other differences are refused
unless `allow_change` (`--config.allow_config_change=True`, e.g. for more steps), and then
recorded in the file's `history`. Fields that do not change what is computed (logging,
devices, processes, parallel strategy) may always change.

All errors are `WorkdirError` (a ValueError) naming the path and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compacter_jax import atomic

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_CONFIG = "run_config.json"
# What a run writes, and what each is (for "X is a file, but the run writes a directory there").
OUTPUT_DIRS = {"checkpoints": "orbax checkpoints", "checkpoints/steps": "step checkpoints",
               "checkpoints/best": "the best checkpoint", "tensorboard": "TensorBoard events",
               "adapter": "the exported adapter", "predictions": "per-example predictions"}
OUTPUT_FILES = {"metrics.jsonl": "the metrics log", "summary.json": "the run's summary",
                "learning_curves.png": "the learning-curve plot", RUN_CONFIG: "the run config",
                LOCK_FILE: "the workdir lock"}
# Never change within one workdir (the checkpoints belong to them).
FIXED_FIELDS = ("task", "method", "model", "peft", "dp")  # dp: the privacy accounting
# Change how, not what, is computed: free to differ on a resume.
OPERATIONAL_FIELDS = ("allow_config_change", "force_unlock", "coordinator_address",
                      "num_processes", "process_id", "detect_cluster", "num_devices",
                      "strategy", "shard_frozen", "remat", "log_every", "keep_checkpoints",
                      "download", "eval_batch_size",
                      # pretraining: when to stop this process, where and what to export
                      "stop_after", "export_dir", "export_snapshots", "eval_diagnostics")


class WorkdirError(ValueError):
    """A workdir that cannot be used as asked; the message names the path and the fix."""


# ----------------------------------------------------------------------------- outputs

def _probe_writable(directory: Path) -> None:
    probe = directory / f".write-test-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"--workdir {directory} is not writable ({e.strerror}); fix its "
                           "permissions or choose another --workdir") from None


def _check_inside(workdir: Path, path: Path, what: str) -> None:
    """An output reached through a symbolic link must stay in the workdir: the lock guards
    the workdir only, and a run's outputs are found there."""
    if not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(workdir.resolve()):
        raise WorkdirError(f"{path} is a symbolic link to {target}, outside the workdir, and "
                           f"the run writes {what} there; replace the link with a real "
                           "directory or file (a run's outputs stay in its workdir)")


def check_writable(workdir: str | os.PathLike) -> Path:
    """Creates `workdir` if needed and checks that every output can be written there: the
    directory itself, and each output path either absent or of the right kind (a directory
    where the run writes one, a file where it writes a file) and writable.

    Returns:
      the workdir as an absolute Path.
    Raises:
      WorkdirError naming the offending path, what the run writes there, and the fix (also
      for an output that is a symbolic link leading out of the workdir).
    """
    workdir = Path(workdir).expanduser().absolute()
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; pass a directory "
                           "(it is created if missing)")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir {workdir} ({e.strerror}); choose a "
                           "writable location") from None
    _probe_writable(workdir)
    for name, what in {**OUTPUT_DIRS, **OUTPUT_FILES}.items():
        _check_inside(workdir, workdir / name, what)
    for name, what in OUTPUT_DIRS.items():
        path = workdir / name
        if path.exists() and not path.is_dir():
            raise WorkdirError(f"{path} is a file, but the run writes {what} there (a "
                               "directory); move or delete it")
        if path.is_dir():
            _probe_writable(path)
    for name, what in OUTPUT_FILES.items():
        path = workdir / name
        if path.is_dir():
            raise WorkdirError(f"{path} is a directory, but the run writes {what} there (a "
                               "file); move or delete it")
        if path.exists() and not os.access(path, os.W_OK):
            raise WorkdirError(f"{path} ({what}) is not writable; fix its permissions or "
                               "delete it")
    return workdir


def remove_stale_temporaries(workdir: str | os.PathLike) -> list[Path]:
    """Deletes what a killed run leaves half-written: the temporaries of `compacter_jax.atomic`
    anywhere in the workdir, and the names earlier versions used (`adapter.tmp-PID`,
    `adapter.old-PID`, `.NAME.PID.tmp`, `predictions/*.tmp`); call with the workdir lock
    held. Returns the removed paths."""
    workdir = Path(workdir)
    patterns = ("adapter.tmp-*", "adapter.old-*", ".*.tmp", ".*.tmp.*", "*.tmp",
                "predictions/*.tmp")
    legacy = sorted({p for pattern in patterns for p in workdir.glob(pattern)})
    for path in legacy:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    found = legacy + atomic.remove_temporaries(workdir, recursive=True)
    if found:
        log.info("removed %d temporary file(s) left by an interrupted run: %s", len(found),
                 ", ".join(p.name for p in found[:5]))
    return found


# -------------------------------------------------------------------------------- lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: Mapping[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(
        started, (int, float)) else "?"
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {when}: "
            f"{holder.get('command', '?')}")


class WorkdirLock:
    """Exclusive use of a workdir by one run (a context manager).

    Args:
      workdir: the run directory (must exist: `check_writable` first).
      force: take over a lock recorded by another host whose process cannot be checked
        (`--config.force_unlock=True`). A lock held by a live process is never taken over.
    """

    def __init__(self, workdir: str | os.PathLike, *, force: bool = False):
        self.path = Path(workdir) / LOCK_FILE
        self.force = force
        self._fd: int | None = None

    def _read(self, fd: int) -> dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        try:
            record = json.loads(text) if text else {}
        except json.JSONDecodeError:
            record = {"pid": "?", "host": "?", "command": f"unreadable lock record {text[:60]!r}"}
        return record if isinstance(record, dict) else {}

    def acquire(self) -> "WorkdirLock":
        """Takes the lock; raises WorkdirError (naming the holder and the fix) if in use."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WorkdirError(f"cannot open the workdir lock {self.path} ({e.strerror}); "
                               "check the workdir's permissions") from None
        try:
            has_flock = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by another run "
                    f"({_describe(self._read(fd))}); wait for it to finish, stop it, or use "
                    "another --workdir") from None
            except OSError as e:  # a filesystem without flock: rely on the record alone
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                has_flock = False
            holder = self._read(fd)
            if holder.get("pid"):
                self._check_stale(holder, has_flock)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_stale(self, holder: Mapping[str, Any], has_flock: bool) -> None:
        same_host = holder.get("host") == socket.gethostname()
        if same_host:
            pid = holder.get("pid")
            alive = isinstance(pid, int) and _pid_alive(pid)
            if alive and not has_flock:  # no flock to tell us: trust the pid
                raise WorkdirError(
                    f"workdir {self.path.parent} is in use by another run ({_describe(holder)}); "
                    "wait for it to finish, stop it, or use another --workdir")
            log.warning("taking over a stale workdir lock (%s: no longer running)",
                        _describe(holder))
            return
        if not self.force:
            raise WorkdirError(
                f"workdir {self.path.parent} is locked by a run on another host "
                f"({_describe(holder)}), which cannot be checked from here. If that run is "
                "no longer running, pass --config.force_unlock=True")
        log.warning("--config.force_unlock: taking over the workdir lock of %s",
                    _describe(holder))

    def release(self) -> None:
        """Clears the record and unlocks (the file stays: deleting it would race)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------ the run's config

def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"peft": {"n": 4}} -> {"peft.n": 4} (lists and tuples compare as lists)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _top(field: str) -> str:
    return field.split(".", 1)[0]


def config_changes(stored: Mapping[str, Any], new: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
    """Fields whose value differs between two run configs: {"field": (stored, new)}.
    Operational fields (`OPERATIONAL_FIELDS`) and fields one of them lacks (a config written
    by another version of the code) are left out."""
    a, b = flatten(stored), flatten(new)
    return {k: (a[k], b[k]) for k in sorted(a.keys() & b.keys())
            if _top(k) not in OPERATIONAL_FIELDS and a[k] != b[k]}


def has_progress(workdir: str | os.PathLike) -> bool:
    """True if the workdir holds something a run would resume (step or best checkpoints, or
    the summary of a finished run)."""
    workdir = Path(workdir)
    steps = [p for sub in ("steps", "best") if (workdir / "checkpoints" / sub).is_dir()
             for p in (workdir / "checkpoints" / sub).iterdir() if p.name.isdigit()]
    return bool(steps) or (workdir / "summary.json").is_file()


def _format_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def refuse_or_allow(changes: Mapping[str, tuple[Any, Any]], allow_change: bool,
                    where: str) -> None:
    """Raises WorkdirError for `changes` to a run's config unless they are allowed."""
    if not changes:
        return
    fixed = {k: v for k, v in changes.items() if _top(k) in FIXED_FIELDS}
    if fixed:
        raise WorkdirError(
            f"{where} holds a run of another experiment ({_format_changes(fixed)}); its "
            "checkpoints, metrics and adapter belong to that run. Use a new --workdir")
    if not allow_change:
        raise WorkdirError(
            f"{where} was started with a different config ({_format_changes(changes)}); "
            "resuming would mix the two. Use a new --workdir, or pass "
            "--config.allow_config_change=True to continue this run with the new values "
            "(e.g. more steps)")
    log.warning("continuing %s with a changed config (--config.allow_config_change): %s",
                where, _format_changes(changes))


def check_resume_config(workdir: str | os.PathLike, config: Mapping[str, Any], *,
                        allow_change: bool = False) -> dict[str, tuple[Any, Any]]:
    """Compares `config` (a plain dict, `ConfigDict.to_dict()`) with the config stored in
    WORKDIR/run_config.json when there is a run to resume, and stores it. Call with the lock
    held.

    Returns:
      the allowed changes ({} when none, or when there is nothing to resume).
    Raises:
      WorkdirError naming the changed fields and the fix.
    """
    path = Path(workdir) / RUN_CONFIG
    stored: dict[str, Any] | None = None
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict):
                raise ValueError("expected an object with a 'config' object")
        except (ValueError, UnicodeDecodeError) as e:
            raise WorkdirError(f"{path} is corrupt ({e}); restore it, or delete it to accept "
                               "the current config for this workdir") from None
    changes: dict[str, tuple[Any, Any]] = {}
    history = []
    if stored is not None and has_progress(workdir):
        changes = config_changes(stored["config"], config)
        refuse_or_allow(changes, allow_change, f"workdir {Path(workdir)}")
        history = list(stored.get("history", []))
    if changes:
        history.append({"time": time.time(),
                        "changes": {k: list(v) for k, v in changes.items()}})
    record = {"config": dict(config), "history": history}
    atomic.atomic_write(path, json.dumps(record, indent=2, sort_keys=True, default=str))
    return changes


def config_history(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The allowed config changes recorded in WORKDIR/run_config.json (oldest first)."""
    try:
        return list(json.loads((Path(workdir) / RUN_CONFIG).read_text()).get("history", []))
    except (OSError, ValueError, AttributeError):
        return []
