"""The one CLI of the training runs (`experiments.glue`, `experiments.multitask`,
`experiments.pretrain`), as flax examples/wmt's main.py:

    if __name__ == "__main__":
        cli.main(train_and_evaluate, "experiments/configs/glue.py", check=check_config)

`--workdir`, `--config` (an ml_collections config file; `--config.<field>=<value>` overrides)
and `--print_config` are defined when `main` runs, never at import, so importing two
experiments in one process defines no duplicate absl flags. The config file is executed once;
an override of a field it lacks is explained by `experiments.spec.unknown_override` (with
the valid fields) before anything else runs. A user's mistake (a bad flag, value,
workdir, input file or model; a diverged run) is one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
# A user's mistake (bad value, missing file, diverged run): one `error:` line and exit code 2.
USER_ERRORS = (ValueError, OSError, FloatingPointError)
_NOISY_LOGGERS = ("absl", "jax._src", "orbax", "absl.logging")
PRINT_CONFIG_HELP = ("Print every config field (--config.<field>=<default>, with any overrides "
                     "given applied, and its type) and exit; --workdir is then not needed.")


def error(message: str) -> int:
    """Prints `error: message` on stderr; returns the exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


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
        return error(str(e))
    return 0


def _config_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the `--config` file argument, or None; argv without it)."""
    value, rest, args = None, [], iter(argv)
    for arg in args:
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config":
            value = next(args, None)
        else:
            rest.append(arg)
    return value, rest


def override_paths(argv: list[str]) -> list[str]:
    """The field paths of the `--config.<path>[=value]` overrides in argv, in order."""
    return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def _field_type(config, path: str):
    """The declared type of the config field at dotted `path` (None when there is none)."""
    *parents, leaf = path.split(".")
    for key in parents:
        config = config.get(key) if hasattr(config, "get") else None
    try:
        return config.get_type(leaf) if config is not None and leaf in config else None
    except (AttributeError, KeyError):
        return None


def comma_lists(config, argv: list[str]) -> list[str]:
    """argv with each `--config.<tuple field>=a,b,c` rewritten as the tuple literal
    `('a', 'b', 'c')`. ml_collections reads a tuple override with `ast.literal_eval`, which
    turns `runs/a,runs/b` into one string and refuses `/abs/a,/abs/b` (a syntax error):
    a comma-separated list of paths is what users type. Values that already parse as a
    Python literal (`"('a', 'b')"`, `"'a','b'"`) are left alone."""
    import ast

    out = []
    for arg in argv:
        path, sep, value = arg[len("--config."):].partition("=")
        if arg.startswith("--config.") and sep and "," in value \
                and _field_type(config, path) is tuple:
            try:
                ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parts = tuple(p.strip() for p in value.split(",") if p.strip())
                arg = f"--config.{path}={parts!r}"
        out.append(arg)
    return out


def load_config(argument: str):
    """`path.py` or `path.py:arg` -> its `get_config()` / `get_config(arg)` (executed once). A
    relative path is also looked for next to this package, so the CLIs run from any
    directory."""
    import importlib.util

    path, _, arg = argument.partition(":")
    if not Path(path).is_file() and not Path(path).is_absolute():
        beside = Path(__file__).resolve().parent.parent / path
        if beside.is_file():
            path = str(beside)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no config file {path}")
    module_spec = importlib.util.spec_from_file_location(f"_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def define_flags(default_config: str, workdir_help: str, config_help: str,
                 argv: list[str] | None = None) -> list[str]:
    """Loads the `--config` file (`default_config` without one), refuses overrides of fields
    it lacks (all at once, each with the valid fields: exit 2), and defines `--workdir`
    (required unless `--print_config`), `--config` (the loaded config, locked; typed
    `--config.<field>` overrides) and `--print_config`.

    Returns:
      argv for absl to parse (without the `--config` file argument, already read).
    """
    from absl import flags
    from ml_collections import config_flags

    from experiments import spec

    argv = list(sys.argv if argv is None else argv)
    argument, rest = _config_argument(argv)
    try:
        config = load_config(argument or default_config)
    except (flags.Error, OSError, ValueError, TypeError, AttributeError, KeyError) as e:
        sys.exit(error(f"--config={argument or default_config}: {e}"))
    problems = [p for path in override_paths(rest)
                if (p := spec.unknown_override(config, path)) is not None]
    if problems:
        sys.exit(error("; ".join(problems)))
    rest = comma_lists(config, rest)
    flags.DEFINE_string("workdir", None, workdir_help)
    config_flags.DEFINE_config_dict("config", config, config_help, lock_config=True,
                                    sys_argv=rest)
    define_print_config()
    return rest


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


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that exits 2 with one clear line instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag or a value of the wrong type
        hint = ("--print_config lists every field with its type" if "--config." in str(e)
                else "--helpfull lists the flags")
        sys.exit(error(f"{e} ({hint})"))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        sys.exit(error(f"bad --config override: {e}"))


def join_processes(config) -> None:
    """Joins a multi-process run when the config has the fields (`coordinator_address`,
    `num_processes`, `process_id`, `detect_cluster`; "" / -1 fall back to $JAX_*), else
    when $JAX_COORDINATOR_ADDRESS is set; a no-op for one process."""
    from compacter_jax.train import init_distributed

    if "num_processes" not in config:
        return
    init_distributed(config.coordinator_address or None,
                     config.num_processes if config.num_processes > 0 else None,
                     config.process_id if config.process_id >= 0 else None,
                     auto_detect=config.detect_cluster)


def run(train_and_evaluate: Callable[[Any, str], Any], config, workdir: str, *,
        check: Callable[[Any], Any] | None = None) -> int:
    """The CLI after flag parsing: `check(config)` (static checks, before any JAX call, so a bad
    value fails on every host), joins a multi-process run if asked, trains.

    Returns:
      0, or 2 after printing one `error:` line (config, data, model, workdir, a diverged run).
    """
    from compacter_jax.train import NonFiniteLossError
    from compacter_jax.train.checkpoint import NonFiniteStateError

    try:
        if check is not None:
            check(config)
        join_processes(config)
        train_and_evaluate(config, workdir)
    except NonFiniteLossError as e:
        return error(f"{e}. No checkpoint holds that update or any later one; lower "
                     "--config.learning_rate or check the data.")
    except NonFiniteStateError as e:
        return error(f"{e} (--config.learning_rate={config.get('learning_rate')}).")
    except USER_ERRORS as e:  # config, data, model, workdir: the message names it
        return error(str(e))
    return 0


def main(train_and_evaluate: Callable[[Any, str], Any], default_config: str, *,
         check: Callable[[Any], Any] | None = None,
         workdir_help: str = "Directory for checkpoints, metrics and outputs.",
         config_help: str = "Config file (ml_collections).") -> None:
    """Defines the flags, parses the command line and runs `train_and_evaluate(config,
    workdir)`; exits with `run`'s code (0 after `--print_config`)."""
    from absl import app

    argv = define_flags(default_config, workdir_help, config_help)

    def _main(argv: list[str]) -> int:
        from absl import flags

        setup_logging(argv)
        if printed_config():
            return 0
        return run(train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir, check=check)

    app.run(lambda argv: sys.exit(_main(argv)), argv=argv, flags_parser=parse_flags)
