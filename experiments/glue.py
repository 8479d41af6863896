r"""Fine-tune T5 with a PEFT method on a GLUE/SuperGLUE task.

  python -m experiments.glue --config experiments/configs/glue.py --workdir runs/rte \
      --config.task=rte --config.method=compacter++ --config.model=random:t5-small

`--config experiments/configs/glue.py:paper` uses the paper's recipe; see experiments/README.md.
`--print_config` lists every config field with its default (and any overrides given) and exits.
Re-running with the same --workdir resumes from the latest checkpoint (the config must match
the run's, see `--config.allow_config_change`). Several processes (hosts) join one run with
`--config.coordinator_address/num_processes/process_id` or `--config.detect_cluster=True`.

Exit codes: 0 done; 2 a bad flag, config value, workdir, input file or model (one line
`error: ...` naming the field or file and the fix), or a diverged run (NaN/inf).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from compacter_jax.train import NonFiniteLossError, init_distributed
from compacter_jax.train.checkpoint import NonFiniteStateError
from experiments import cli
from experiments.finetune import train_and_evaluate
from experiments.validation import validate_config

FLAGS = flags.FLAGS
# Found next to this module, so the CLI runs from any directory (and from an installed package).
DEFAULT_CONFIG = str(Path(__file__).resolve().parent / "configs" / "glue.py")
EXIT_USAGE = 2


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _load_config_file(spec: str) -> ConfigDict:
    """`path.py` or `path.py:arg` -> its `get_config()` / `get_config(arg)`, as the flag does."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_config_for_errors", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _unknown_overrides(argv: list[str]) -> list[str]:
    """`--config.<path>` overrides naming no field of the config, each with the valid ones."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    config = _load_config_file(spec or DEFAULT_CONFIG)
    problems = []
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0]
        node, parts = config, path.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ConfigDict) or part not in node:
                parent = ".".join(["config", *parts[:i]])
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else ""
                problems.append(f"--config.{path}: {parent} has no field {part!r}"
                                + (f"; valid fields: {valid}" if valid else ""))
                break
            node = node[part]
    return problems


def _override_error(argv: list[str], error: BaseException) -> int:
    try:
        problems = _unknown_overrides(argv)
    except Exception:  # the config file itself does not load: report the original error
        problems = []
    return _error("; ".join(problems) or f"bad --config override: {error!r}")


flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
cli.define_print_config()
try:  # without --config on the command line, the default file and overrides parse right here
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                    "Training config file (ml_collections).", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as e:
    if __name__ != "__main__":
        raise
    sys.exit(_override_error(sys.argv, e))


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that exits 2 with one clear line instead of a traceback."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # an unknown flag or a value of the wrong type
        sys.exit(_error(f"{e} (python -m experiments.glue --helpfull lists the flags)"))
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a field the config lacks
        sys.exit(_override_error(argv, e))


def run(config: ConfigDict, workdir: str) -> int:
    """Validates `config`, joins a multi-process run if asked, trains; returns the exit code."""
    try:
        validate_config(config)  # before any JAX call, so a bad value fails on every host
        init_distributed(config.coordinator_address or None,
                         config.num_processes if config.num_processes > 0 else None,
                         config.process_id if config.process_id >= 0 else None,
                         auto_detect=config.detect_cluster)
        train_and_evaluate(config, workdir)
    except NonFiniteLossError as e:
        return _error(f"{e}. No checkpoint holds that update or any later one; lower "
                      "--config.learning_rate or check the data.")
    except NonFiniteStateError as e:
        return _error(f"{e} (--config.learning_rate={config.learning_rate}).")
    except (ValueError, OSError) as e:  # config, data, model, workdir: the message names it
        return _error(str(e))
    return 0


def main(argv: list[str]) -> int:
    cli.setup_logging(argv)
    if cli.printed_config():
        return 0
    return run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
