"""What the experiment CLIs share: quiet library logging, the exit-2 rule for bad input, and the
`--workdir` / `--config` flags (defined only when a module runs as a program, so importing two
experiments in one process defines no duplicate absl flags)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A user's mistake (bad value, missing file, diverged run): one `error:` line and exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, FloatingPointError)
_NOISY_LOGGERS = ("absl", "jax._src", "orbax", "absl.logging")


def setup_logging(argv: list[str]) -> None:
    """INFO logging for our modules, warnings only for JAX/orbax/absl; refuses positional args."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def exit_code(run: Callable[..., Any], *args: Any) -> int:
    """0 after `run(*args)`; 2, with the error printed on one line, when it raises USER_ERRORS."""
    try:
        run(*args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


PRINT_CONFIG_HELP = ("Print every config field (--config.<field>=<default>, with any overrides "
                     "given applied, and its type) and exit; --workdir is then not needed.")


def define_flags(default_config: str, workdir_help: str, config_help: str) -> None:
    """`--workdir` (required unless `--print_config`), `--config` (an ml_collections config
    file, locked) and `--print_config`. A relative `default_config`
    ("experiments/configs/x.py") is found next to this package, so the CLIs run from any
    directory."""
    from absl import flags
    from ml_collections import config_flags

    if not Path(default_config).is_absolute():
        default_config = str(Path(__file__).resolve().parent.parent / default_config)

    flags.DEFINE_string("workdir", None, workdir_help)
    config_flags.DEFINE_config_file("config", default_config, config_help, lock_config=True)
    define_print_config()


def define_print_config() -> None:
    """`--print_config`, and `--workdir` required unless it is given."""
    from absl import flags

    flags.DEFINE_bool("print_config", False, PRINT_CONFIG_HELP)
    flags.register_multi_flags_validator(
        ["workdir", "print_config"], lambda v: bool(v["workdir"]) or v["print_config"],
        message="--workdir is required (or --print_config to list the config fields)")


def format_config(config: Any, prefix: str = "--config") -> str:
    """One line per field of an ml_collections config, nested fields included:
    `--config.<path>=<value>  # <type>` (placeholders: None and their type)."""
    from ml_collections import ConfigDict

    lines = []
    for key in config.keys():
        value = config[key]
        if isinstance(value, ConfigDict):
            lines.append(format_config(value, f"{prefix}.{key}"))
            continue
        kind = config.get_type(key)
        lines.append(f"{prefix}.{key}={value!r}  # {getattr(kind, '__name__', kind)}")
    return "\n".join(line for line in lines if line)


def printed_config() -> bool:
    """True after printing the config when `--print_config` was given (the CLI then exits 0)."""
    from absl import flags

    if not flags.FLAGS.print_config:
        return False
    print(format_config(flags.FLAGS.config))
    return True
