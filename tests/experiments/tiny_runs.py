"""One tiny fine-tuning run shared by the reliability and multi-host tests (it is their
reference, and compiling it dominates their time), with the settings that make it fast.

    with fast_compiles():                          # XLA without most optimisations + a cache
        workdir, summary = reference_run(tmp_path_factory)   # computed once per session

`reference_run` is 1 process x 4 CPU devices (tests/conftest.py), random:t5-tiny, RTE, 4 steps
(evaluated and checkpointed at steps 2 and 4). Tests copy its workdir before changing it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax

from experiments import finetune
from experiments.configs.glue import get_config

SETTINGS = dict(task="rte", model="random:t5-tiny", fallback_model="", max_source_length=32, batch_size=8,
                eval_batch_size=4, train_samples=48, max_eval_samples=8, eval_mode="generate",
                learning_rate=1e-2, warmup_steps=1, max_steps=4, eval_every=2, save_every=2,
                log_every=1)
PEFT = dict(reduction_factor=8)

# One persistent compilation cache for the session: the runs of these tests (and the processes
# they start) compile the same programs again and again.
_CACHE_DIR = Path(tempfile.mkdtemp(prefix="compacter_test_jax_cache_"))
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)


def tiny_config(**overrides):
    """The glue config with `SETTINGS`, then `overrides` (`peft.<field>` for the method's)."""
    c = get_config()
    for key, value in {**SETTINGS, **{f"peft.{k}": v for k, v in PEFT.items()},
                       **overrides}.items():
        target = c.peft if key.startswith("peft.") else c
        setattr(target, key.removeprefix("peft."), value)
    return c


def cli_flags() -> list[str]:
    """`SETTINGS` and `PEFT` as `python -m experiments.glue` flags."""
    return ([f"--config.{k}={v}" for k, v in SETTINGS.items()]
            + [f"--config.peft.{k}={v}" for k, v in PEFT.items()])


def fast_compile_env() -> dict[str, str]:
    """Environment for a subprocess to compile like `fast_compiles` (and share its cache)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(_CACHE_DIR),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@contextlib.contextmanager
def fast_compiles() -> Iterator[None]:
    """XLA skips most optimisations (compile time dominates these tiny runs) and compiled
    programs go to the session's persistent cache; the settings are restored afterwards."""
    settings = {"jax_compilation_cache_dir": str(_CACHE_DIR),
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_disable_most_optimizations": True}
    before = {k: jax.config.values[k] for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def _session_root(tmp_path_factory) -> Path:
    """The session's temporary root, shared by all pytest-xdist workers (`make test -n 2`)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def reference_run(tmp_path_factory) -> tuple[Path, dict]:
    """(workdir, summary) of `tiny_config()` trained straight through; computed once per
    session, by whichever xdist worker asks first (the others wait for it). Call inside
    `fast_compiles`. Do not modify the workdir: copy it."""
    root = _session_root(tmp_path_factory)
    workdir, done = root / "tiny_reference_run", root / "tiny_reference_run.done"
    with open(root / "tiny_reference_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # an attempt that failed
            finetune.train_and_evaluate(tiny_config(), workdir)
            done.touch()
    return workdir, json.loads((workdir / "summary.json").read_text())
