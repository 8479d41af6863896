"""experiments.workdir: the lock (live, stale, other host, force), the stored run config and
its comparison, the output checks and the clean-up of a killed run's temporaries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import workdir as wd

ROOT = Path(__file__).resolve().parents[2]


def write_holder(workdir: Path, **record) -> None:
    (workdir / wd.LOCK_FILE).write_text(json.dumps(
        {"pid": 1, "host": socket.gethostname(), "started": 0, "command": "x", **record}))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_lock_is_exclusive_and_released(tmp_path):
    with wd.WorkdirLock(tmp_path):
        record = json.loads((tmp_path / wd.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(wd.WorkdirError, match=rf"in use by another run \(pid {os.getpid()}"):
            wd.WorkdirLock(tmp_path).acquire()  # a second open file: refused even in-process
    assert (tmp_path / wd.LOCK_FILE).read_text() == ""  # released: record cleared
    with wd.WorkdirLock(tmp_path):
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    pid = dead_pid()
    write_holder(tmp_path, pid=pid)
    with caplog.at_level("WARNING"), wd.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / wd.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"stale workdir lock (pid {pid} on host" in caplog.text


def test_lock_of_another_host_needs_force(tmp_path, caplog):
    write_holder(tmp_path, pid=4242, host="gpu-node-7")
    with pytest.raises(wd.WorkdirError, match=r"locked by a run on another host \(pid 4242 on "
                                              r"host gpu-node-7.*--config.force_unlock=True"):
        wd.WorkdirLock(tmp_path).acquire()
    with caplog.at_level("WARNING"), wd.WorkdirLock(tmp_path, force=True):
        pass
    assert "force_unlock: taking over the workdir lock of pid 4242 on host gpu-node-7" in \
        caplog.text


def test_a_killed_holder_leaves_a_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from experiments.workdir import WorkdirLock; "
         f"WorkdirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); "
         "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(wd.WorkdirError, match=f"pid {holder.pid}"):
        wd.WorkdirLock(tmp_path, force=True).acquire()  # alive: never taken over
    holder.kill()
    holder.wait()
    with wd.WorkdirLock(tmp_path):  # SIGKILL: the flock died with it, the record is stale
        pass


def test_config_changes_ignore_operational_fields():
    stored = {"task": "rte", "learning_rate": None, "max_steps": 80, "log_every": 10,
              "num_devices": 1, "peft": {"n": 4, "positions": ("feed_forward",)}, "old": 1}
    new = {"task": "rte", "learning_rate": None, "max_steps": 160, "log_every": 1,
           "num_devices": 4, "peft": {"n": 4, "positions": ["feed_forward"]}, "added": 2}
    assert wd.config_changes(stored, new) == {"max_steps": (80, 160)}
    with pytest.raises(wd.WorkdirError, match=r"max_steps: 80 -> 160.*allow_config_change"):
        wd.refuse_or_allow({"max_steps": (80, 160)}, False, "workdir w")
    wd.refuse_or_allow({"max_steps": (80, 160)}, True, "workdir w")
    with pytest.raises(wd.WorkdirError, match=r"another experiment \(peft.n: 4 -> 8\)"):
        wd.refuse_or_allow({"peft.n": (4, 8)}, True, "workdir w")  # never, even when allowed


def test_run_config_is_compared_only_when_there_is_progress(tmp_path):
    config = {"task": "rte", "max_steps": 80, "peft": {"n": 4}}
    assert wd.check_resume_config(tmp_path, config) == {}
    # Nothing to resume yet (a run that failed early, a typo fixed): the new config is kept.
    assert wd.check_resume_config(tmp_path, {**config, "task": "mrpc"}) == {}
    assert json.loads((tmp_path / wd.RUN_CONFIG).read_text())["config"]["task"] == "mrpc"
    (tmp_path / "checkpoints" / "steps" / "40").mkdir(parents=True)
    assert wd.has_progress(tmp_path)
    with pytest.raises(wd.WorkdirError, match="task: 'mrpc' -> 'rte'"):
        wd.check_resume_config(tmp_path, config)
    more = {**config, "task": "mrpc", "max_steps": 160}
    with pytest.raises(wd.WorkdirError, match="max_steps: 80 -> 160"):
        wd.check_resume_config(tmp_path, more)
    assert wd.check_resume_config(tmp_path, more, allow_change=True) == {"max_steps": (80, 160)}
    assert wd.check_resume_config(tmp_path, more) == {}  # the stored config is the new one
    assert [h["changes"] for h in wd.config_history(tmp_path)] == [{"max_steps": [80, 160]}]
    (tmp_path / wd.RUN_CONFIG).write_text("[1, 2")
    with pytest.raises(wd.WorkdirError, match=r"run_config.json is corrupt.*delete it"):
        wd.check_resume_config(tmp_path, more)


def test_check_writable_and_stale_temporaries(tmp_path):
    workdir = wd.check_writable(tmp_path / "new" / "run")  # created, parents too
    assert workdir.is_dir() and workdir.is_absolute()
    (workdir / "metrics.jsonl").write_text("")
    (workdir / "metrics.jsonl").chmod(0o444)
    if os.geteuid() != 0:  # root may write anyway
        with pytest.raises(wd.WorkdirError, match=r"metrics.jsonl \(the metrics log\) is not "
                                                  r"writable"):
            wd.check_writable(workdir)
    (workdir / "metrics.jsonl").chmod(0o644)
    (workdir / "checkpoints").mkdir()
    (workdir / "checkpoints" / "best").write_text("")
    with pytest.raises(wd.WorkdirError, match=r"checkpoints/best is a file, but the run "
                                              r"writes the best checkpoint there"):
        wd.check_writable(workdir)
    (workdir / "checkpoints" / "best").unlink()
    for stray in ("adapter.tmp-123", "adapter.old-456", "predictions/validation.jsonl.tmp"):
        (workdir / stray).mkdir(parents=True) if "adapter" in stray else (
            (workdir / stray).parent.mkdir(), (workdir / stray).write_text("{"))
    (workdir / ".summary.99.tmp.json").write_text("{")
    (workdir / "adapter").mkdir()
    removed = {p.name for p in wd.remove_stale_temporaries(workdir)}
    assert removed == {"adapter.tmp-123", "adapter.old-456", "validation.jsonl.tmp",
                       ".summary.99.tmp.json"}
    assert sorted(p.name for p in workdir.iterdir()) == ["adapter", "checkpoints",
                                                         "metrics.jsonl", "predictions"]


def test_an_output_linked_out_of_the_workdir_is_refused(tmp_path):
    """A `predictions/` (or any output) that is a symbolic link leading out of the workdir
    would write outside it, beyond the lock's reach: refused up front, naming it."""
    workdir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    workdir.mkdir()
    elsewhere.mkdir()
    (workdir / "predictions").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(wd.WorkdirError, match=rf"{workdir / 'predictions'} is a symbolic link "
                                              rf"to {elsewhere}, outside the workdir, and the "
                                              r"run writes per-example predictions there"):
        wd.check_writable(workdir)
    (workdir / "predictions").unlink()
    (workdir / "summary.json").symlink_to(elsewhere / "absent.json")  # dangling
    with pytest.raises(wd.WorkdirError, match=r"summary.json is a symbolic link to .*absent"):
        wd.check_writable(workdir)
    (workdir / "summary.json").unlink()
    (workdir / "kept").mkdir()  # a link that stays inside the workdir is fine
    (workdir / "predictions").symlink_to(workdir / "kept", target_is_directory=True)
    assert wd.check_writable(workdir) == workdir


def test_temporaries_of_any_writer_are_removed_and_a_failed_config_write_keeps_the_old(
        tmp_path, monkeypatch):
    """remove_stale_temporaries knows `compacter_jax.atomic`'s names, not each writer's: a
    killed export, summary or prediction file anywhere in the workdir goes, nothing else."""
    from compacter_jax import atomic

    (tmp_path / "adapters" / "rte").mkdir(parents=True)
    (tmp_path / "predictions").mkdir()
    (tmp_path / "adapter").mkdir()
    # What SIGKILL leaves mid-write (a Python exception would have cleaned up itself).
    stray = [tmp_path / ".adapter.123.0123abcd.tmp", tmp_path / ".adapter.123.0123abcd.old",
             tmp_path / "adapters" / ".rte.45.89abcdef.tmp",
             tmp_path / "adapters" / "rte" / ".trainable.safetensors.45.00ff00ff.tmp",
             tmp_path / "predictions" / ".validation.jsonl.6.deadbeef.tmp",
             tmp_path / ".summary.json.7.cafebabe.tmp"]
    for path in stray:
        if "adapter." in path.name or ".rte." in path.name:
            path.mkdir()
            (path / "trainable_config.json").write_text("{")
        else:
            path.write_text("half")
    (tmp_path / "adapter" / "trainable_config.json").write_text("{}")
    (tmp_path / ".hidden").write_text("keep")             # not a temporary of ours
    stray_names = {p.name for p in stray}
    assert {p.name for p in wd.remove_stale_temporaries(tmp_path)} == stray_names
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        ".hidden", "adapter", "adapter/trainable_config.json", "adapters", "adapters/rte",
        "predictions"]

    assert wd.check_resume_config(tmp_path, {"task": "rte"}) == {}
    before = (tmp_path / wd.RUN_CONFIG).read_text()

    def disk_fails(*_):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("os.fsync", disk_fails)
    with pytest.raises(OSError, match="injected"):
        wd.check_resume_config(tmp_path, {"task": "mrpc"})
    assert (tmp_path / wd.RUN_CONFIG).read_text() == before
    assert not [p for p in tmp_path.rglob("*") if atomic.is_temporary(p)]
