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

from experiments import cli
from experiments.finetune import check_config, train_and_evaluate


def run(config, workdir: str) -> int:
    """The command after flag parsing (checks, joins the processes, trains): its exit code."""
    return cli.run(train_and_evaluate, config, workdir, check=check_config)


if __name__ == "__main__":
    cli.main(train_and_evaluate, "experiments/configs/glue.py", check=check_config,
             workdir_help="Directory for checkpoints, metrics and plots.",
             config_help="Training config file (ml_collections).")
