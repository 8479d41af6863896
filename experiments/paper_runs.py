"""Prints (or runs) the command of every paper run: `python -m experiments.paper_runs [--run]`.

    python -m experiments.paper_runs --tasks rte,mrpc --methods compacter,compacter++
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from experiments.configs.paper import GLUE_TASKS, METHODS, SUPERGLUE_TASKS


def commands(tasks, methods, workdir_root: str, extra: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "experiments.glue",
             "--config", f"experiments/configs/paper.py:{task},{method}",
             "--workdir", f"{workdir_root}/{task}/{method}", *extra]
            for task in tasks for method in methods]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default=",".join(GLUE_TASKS + SUPERGLUE_TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workdir-root", default="runs/paper")
    parser.add_argument("--run", action="store_true", help="run them one after another")
    args, extra = parser.parse_known_args(argv)
    cmds = commands(args.tasks.split(","), args.methods.split(","), args.workdir_root, extra)
    for cmd in cmds:
        print(shlex.join(cmd))
        if args.run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
