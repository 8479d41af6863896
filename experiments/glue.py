r"""Fine-tune T5 with a PEFT method on a GLUE/SuperGLUE task.

  python -m experiments.glue --config experiments/configs/glue.py --workdir runs/rte \
      --config.task=rte --config.method=compacter++ --config.model=random:t5-small

`--config experiments/configs/glue.py:paper` uses the paper's recipe; see experiments/README.md.
Re-running with the same --workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from compacter_jax.train import NonFiniteLossError, init_distributed
from experiments.finetune import train_and_evaluate

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.",
                    required=True)
config_flags.DEFINE_config_file("config", "experiments/configs/glue.py",
                                "Training config file (ml_collections).", lock_config=True)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "absl.logging"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    init_distributed()  # multi-host when JAX_COORDINATOR_ADDRESS is set; else a no-op

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}. No checkpoint was written after the last finite step; lower "
              "--config.learning_rate or check the data.", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
