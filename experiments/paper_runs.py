"""The paper's grid as commands: print them, run them, or list them as JSON.

    python -m experiments.paper_runs                       # one command per (task, method)
    python -m experiments.paper_runs --sweep               # the paper's grid (Tables 1 and 2)
    python -m experiments.paper_runs --sweep --tasks rte --methods compacter --run
    python -m experiments.paper_runs --low-resource        # 100 ... 4000 training examples
    python -m experiments.paper_runs --sweep --json --config.model=/path/to/t5-base
    python -m experiments.paper_runs --dp-epsilons 3,8 --tasks sst2 --methods compacter++,lora

`--sweep` enumerates, per task and method, the reduction factors {32, 16, 8} of the adapter
methods, n in {4, 8, 12} of the PHM ones (only values that fit the model's sizes) and the
method's learning rate (`--learning-rates` to try others). Workdirs encode the configuration:
`WORKDIR_ROOT/TASK/METHOD/rf32_n4_lr3e-3[_train100]`. Extra `--config.*` flags are passed to
every run; `--config.peft.FIELD` only to methods that have FIELD; a flag that sets a swept
field (`--config.peft.reduction_factor`, `--config.peft.n`, `--config.learning_rate`,
`--config.train_samples`) pins that axis to its value. `--run` runs the commands one after
another, skipping runs whose `summary.json` exists (a stopped run resumes from its checkpoint).

`--dp-epsilons 3,8` (implies `--sweep`) adds to every configuration its differentially private
runs (`experiments.dp`): `--config.dp.epsilon=E` (the noise calibrated so the run spends at
most E; delta left to the DP code's rule, 1 / N**1.1, unless `--config.dp.delta` is passed)
and `--config.packing=False` (each example's gradient is clipped: one example per row; the
batches are then Poisson-sampled by the DP code), in `.../rf32_n4_lr3e-3_dp-eps3`.
`--config.dp.*` flags reach the DP runs only; `--config.dp.epsilon=E` pins the grid to DP
runs at E.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import json
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import peft
from experiments import paper, tool_cli
from experiments.paper import GLUE_TASKS, METHODS, SUPERGLUE_TASKS

FLOAT32_MAX = float(np.finfo(np.float32).max)  # a rate the run's float32 optimizer can hold
CONFIG_FILE = Path(__file__).resolve().parent / "configs" / "paper.py"
SUMMARY_FILE = "summary.json"
# Config fields a sweep sets itself; a passed-through flag for one pins that axis.
PINNABLE = {"peft.reduction_factor": int, "peft.n": int, "learning_rate": float,
            "train_samples": int, "dp.epsilon": float}


def config_path() -> str:
    """paper.py as the commands name it: relative to the current directory when inside it."""
    rel = os.path.relpath(CONFIG_FILE)
    return str(CONFIG_FILE) if rel.startswith("..") else rel


def commands(tasks, methods, workdir_root: str, extra: list[str]) -> list[list[str]]:
    """One command per (task, method) with the method's preset (no sweep)."""
    return [[sys.executable, "-m", "experiments.glue",
             "--config", f"{config_path()}:{task},{method}",
             "--workdir", f"{workdir_root}/{task}/{method}", *extra]
            for task in tasks for method in methods]


# ------------------------------------------------------------------------------ the grid


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the grid.

    Attributes:
      task / method: registry names ("rte", "compacter").
      axes: the swept method fields and their values, e.g. (("reduction_factor", 32), ("n", 4)).
      learning_rate: the peak learning rate.
      train_samples: training examples of a low-resource run (None: the whole training set).
      peft_flags: passed-through `--config.peft.*` flags that apply to this method.
      dp_epsilon: the target epsilon of a differentially private run (None: not private).
      dp_flags: passed-through `--config.dp.*` flags (given to DP runs only).
    """

    task: str
    method: str
    axes: tuple[tuple[str, int], ...]
    learning_rate: float
    train_samples: int | None = None
    peft_flags: tuple[str, ...] = ()
    dp_epsilon: float | None = None
    dp_flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The configuration's directory name, e.g. "rf32_n4_lr3e-3_train100_dp-eps3"."""
        return paper.config_name(dict(self.axes), self.learning_rate, self.train_samples,
                                 self.dp_epsilon)

    def workdir(self, root: str) -> str:
        return f"{root}/{self.task}/{self.method}/{self.name}"

    def flags(self, root: str, extra: Sequence[str] = ()) -> list[str]:
        """The `experiments.glue` flags of this run (`extra` last)."""
        sweep = [f"--config.peft.{k}={v}" for k, v in self.axes]
        sweep.append(f"--config.learning_rate={self.learning_rate!r}")
        if self.train_samples:
            sweep.append(f"--config.train_samples={self.train_samples}")
        if self.dp_epsilon is not None:  # DP clips per example: padded rows, one example each
            sweep += [f"--config.dp.epsilon={paper.format_epsilon(self.dp_epsilon)}",
                      "--config.packing=False", *self.dp_flags]
        return ["--config", f"{config_path()}:{self.task},{self.method}",
                "--workdir", self.workdir(root), *sweep, *self.peft_flags, *extra]

    def command(self, root: str, extra: Sequence[str] = ()) -> list[str]:
        return [sys.executable, "-m", "experiments.glue", *self.flags(root, extra)]


@dataclasses.dataclass(frozen=True)
class PassThrough:
    """The extra `--config.*` flags, sorted by what the sweep does with them.

    Attributes:
      common: flags given to every run.
      peft: {field: flag tokens} of `--config.peft.FIELD` flags (given to methods with FIELD).
      peft_values: {field: value} of those flags (for checking which configurations fit).
      pinned: {config field: value} of flags that set a swept field.
      model: the `--config.model` value, if given.
      dp: `--config.dp.*` flag tokens (but `dp.epsilon`, pinned): given to DP runs only.
      packing: the `--config.packing` value, if given (DP runs refuse True).
    """

    common: tuple[str, ...] = ()
    peft: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    peft_values: dict[str, Any] = dataclasses.field(default_factory=dict)
    pinned: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str | None = None
    dp: tuple[str, ...] = ()
    packing: Any = None


def split_extra(extra: Sequence[str]) -> PassThrough:
    """Sorts `--config.FIELD=VALUE` / `--config.FIELD VALUE` flags (see `PassThrough`).

    Raises ValueError for anything that is not a `--config.` flag (a mistyped option would
    otherwise reach every run), for a pinned value of the wrong type and for
    `--config.dp.noise_multiplier` (the grid names DP runs by their target epsilon).
    """
    common: list[str] = []
    dp_flags: list[str] = []
    peft_flags: dict[str, tuple[str, ...]] = {}
    peft_values: dict[str, Any] = {}
    pinned: dict[str, Any] = {}
    model = None
    tokens = list(extra)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--config."):
            raise ValueError(f"unknown argument {token!r}: only --config.FIELD=VALUE flags are "
                             "passed through to the runs (see --help)")
        name, sep, value = token[len("--config."):].partition("=")
        used = [token]
        if not sep and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value, sep = tokens[i + 1], "="
            used.append(value)
        i += len(used)
        if name in PINNABLE:
            if not sep:
                raise ValueError(f"--config.{name} needs a value")
            pinned[name] = _pinned_value(name, value)
        elif name.startswith("peft."):
            field = name[len("peft."):]
            peft_flags[field] = tuple(used)
            peft_values[field] = _literal(value) if sep else True
        elif name.startswith("dp."):
            _check_dp_flag(name)
            dp_flags.extend(used)
        else:
            if name == "model" and sep:
                model = value
            common.extend(used)
    packing = _packing(common)
    return PassThrough(tuple(common), peft_flags, peft_values, pinned, model, tuple(dp_flags),
                       packing)


def _check_dp_flag(name: str) -> None:
    if name == "dp.noise_multiplier":
        raise ValueError("--config.dp.noise_multiplier: the grid's DP runs are named by their "
                         "target epsilon and calibrate their own noise; use --dp-epsilons "
                         "(e.g. 3,8), or run a fixed noise with experiments.glue directly")


def _packing(common: Sequence[str]) -> Any:
    """The last `--config.packing` value among the common flags (None if not given)."""
    value = None
    for i, token in enumerate(common):
        if token == "--config.packing":
            value = _literal(common[i + 1]) if i + 1 < len(common) else True
        elif token.startswith("--config.packing="):
            value = _literal(token.partition("=")[2])
    return value


def _pinned_value(name: str, text: str) -> Any:
    """The value of a flag that pins a swept axis; ValueError naming the flag when it is not
    one a run can use (a rate <= 0 would fail every run; `train_samples=-1` is the whole
    training set, as in the config)."""
    kind = PINNABLE[name]
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"--config.{name}={text!r}: expected {kind.__name__}") from None
    if name == "learning_rate" and not tool_cli.positive_finite(value, FLOAT32_MAX):
        raise ValueError(f"--config.learning_rate={text}: expected a positive finite rate "
                         "(e.g. 3e-4)")
    if name == "train_samples" and value == -1:
        return None  # the whole training set: the full-data run
    if name == "train_samples" and value <= 0:
        raise ValueError(f"--config.train_samples={text}: expected a positive number of "
                         "training examples (or -1, the whole training set)")
    if name == "dp.epsilon" and not tool_cli.positive_finite(value):
        raise ValueError(f"--config.dp.epsilon={text}: expected a positive finite target "
                         "epsilon (e.g. 3 or 8)")
    return value


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclasses.dataclass(frozen=True)
class Sweep:
    """The runs of a grid and the configurations left out (with why)."""

    runs: list[Run]
    skipped: list[str]


def sweep(tasks: Sequence[str], methods: Sequence[str], *,
          learning_rates: Sequence[float] | None = None,
          train_sizes: Sequence[int] | None = None,
          passthrough: PassThrough = PassThrough(),
          dp_epsilons: Sequence[float] | None = None) -> Sweep:
    """The paper's grid for `tasks` x `methods` (see the module doc).

    Args:
      tasks / methods: registry names, in the order the runs should come.
      learning_rates: rates to try for every method (None: the method's own, the original's).
      train_sizes: low-resource training sizes (None: the whole training set). A size at or
        above a task's training set is left out (it would repeat the full-data run).
      passthrough: the extra flags (`split_extra`); `model` decides which n and reduction
        factors fit (default the paper's t5-base).
      dp_epsilons: target epsilons of differentially private runs added to every
        configuration (a pinned `--config.dp.epsilon` replaces the non-private runs).

    Returns:
      `Sweep`: the runs, task-major, then method, configuration, learning rate, size and
      privacy (the non-private run first).
    """
    _check_grid_values(learning_rates, train_sizes)
    privacy = _privacy_variants(dp_epsilons, passthrough)
    t5 = paper.model_config(passthrough.model or paper.PAPER_MODEL)
    pinned = passthrough.pinned
    runs: list[Run] = []
    skipped: list[str] = []
    for method_name in methods:
        peft.get_method(method_name)  # an unknown name raises, listing the valid ones
    for task in tasks:
        data_lib.get_task(task)  # an unknown task raises, naming the valid ones
        sizes = _sizes(task, train_sizes, pinned, skipped)
        for method_name in methods:
            method = peft.get_method(method_name)
            fields = set(method.config_field_names())
            peft_flags = tuple(t for f, toks in passthrough.peft.items() if f in fields
                               for t in toks)
            fixed = {f: v for f, v in passthrough.peft_values.items() if f in fields}
            axes = {k: (pinned[f"peft.{k}"],) if f"peft.{k}" in pinned else values
                    for k, values in paper.sweep_axes(method).items()}
            rates = (learning_rates or ([pinned["learning_rate"]] if "learning_rate" in pinned
                                        else [method.learning_rate]))
            for combo in itertools.product(*axes.values()):
                chosen = dict(zip(axes, combo))
                try:
                    method.replace(**fixed, **chosen).validate(t5)
                except ValueError as e:
                    if task == tasks[0]:  # the same for every task: say it once
                        skipped.append(f"{method_name} {paper.config_name(chosen, rates[0])}: "
                                       f"{e}")
                    continue
                for lr, size, eps in itertools.product(rates, sizes, privacy):
                    runs.append(Run(task, method_name, tuple(chosen.items()), float(lr), size,
                                    peft_flags, eps, passthrough.dp if eps else ()))
    return Sweep(runs, skipped)


def _check_grid_values(learning_rates, train_sizes) -> None:
    """ValueError for a rate or size no run can use (a rate <= 0 fails every run; a size <= 0
    would train on the whole set under a low-resource name)."""
    for lr in learning_rates or ():
        if not tool_cli.positive_finite(lr, FLOAT32_MAX):
            raise ValueError(f"learning rate {lr!r}: expected a positive finite rate "
                             "(--learning-rates, e.g. 3e-4,1e-3)")
    for n in train_sizes or ():
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"training-set size {n!r}: expected a positive number of "
                             "examples (--train-sizes, e.g. 100,500)")


def _privacy_variants(dp_epsilons, passthrough: PassThrough) -> list[float | None]:
    """[None (the non-private run), *target epsilons]; only the pinned epsilon when
    `--config.dp.epsilon` is passed. ValueError for an epsilon no run can use, and for
    `--config.packing=True` with DP runs (they clip per example: one example per row)."""
    for eps in dp_epsilons or ():
        if isinstance(eps, bool) or not tool_cli.positive_finite(eps):
            raise ValueError(f"target epsilon {eps!r}: expected a positive finite epsilon "
                             "(--dp-epsilons, e.g. 3,8)")
    pinned = passthrough.pinned.get("dp.epsilon")
    if pinned is not None and dp_epsilons:
        raise ValueError(f"--config.dp.epsilon={pinned:g} and --dp-epsilons: set one (the "
                         "flag pins every run to one target; --dp-epsilons adds DP runs)")
    variants = [pinned] if pinned is not None else [None, *(float(e) for e in dp_epsilons or ())]
    if variants != [None] and str(passthrough.packing).lower() not in ("none", "false", "0"):
        raise ValueError(f"--config.packing={passthrough.packing}: differentially private runs "
                         "clip each example's gradient and need padded batches (one example "
                         "per row); drop the flag (DP runs get --config.packing=False)")
    return variants


def _sizes(task: str, train_sizes, pinned, skipped: list[str]) -> list[int | None]:
    if "train_samples" in pinned:
        return [pinned["train_samples"]]
    if not train_sizes:
        return [None]
    try:
        available = paper.paper_train_size(task)
    except ValueError:  # a task outside the paper's tables: no size known, keep every size
        return list(train_sizes)
    kept = [n for n in train_sizes if n < available]
    for n in sorted(set(train_sizes) - set(kept)):
        skipped.append(f"{task} train{n}: the training set has only {available} examples "
                       "(the full-data run covers it)")
    return kept


# ------------------------------------------------------------------------------ configs


def parse_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The config `experiments.glue` runs with for these flags (`Run.flags`), parsed by
    ml_collections as the CLI does (a fresh flag registry, so it can be called repeatedly).
    absl parses here the training CLI's flags, not this tool's (argparse, `tool_cli`)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["experiments.glue", *argv]
    registry = flags.FlagValues()
    # sys_argv: the override flags (--config.x) are registered from the argv given here.
    holder = config_flags.DEFINE_config_file("config", None, "config file",
                                             flag_values=registry, lock_config=True,
                                             sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory", flag_values=registry)
    with warnings.catch_warnings():  # ml_collections loads the file with importlib's old API
        warnings.filterwarnings("ignore", r"the load_module\(\) method is deprecated",
                                DeprecationWarning)
        registry(argv)
    return holder.value


def run_steps(run: Run, root: str, extra: Sequence[str] = ()) -> tuple[int, int]:
    """(training examples, total optimizer steps) of `run` with the paper's data sizes."""
    from experiments.finetune import schedule_length  # imports JAX: only when asked

    config = parse_config(run.flags(root, extra))
    task = data_lib.get_task(config.task)
    n_train = paper.paper_train_size(task.name, config.train_samples if config.train_samples > 0
                                     else None)
    per_epoch = data_lib.steps_per_epoch(n_train, config.batch_size)
    return n_train, schedule_length(config, task.is_small, per_epoch)[0]


# ------------------------------------------------------------------------------ the CLI


def run_all(cmds: list[tuple[str, list[str]]]) -> int:
    """Runs (workdir, command) pairs in order, skipping finished ones; 1 if any failed."""
    failed = []
    for workdir, cmd in cmds:
        if (Path(workdir) / SUMMARY_FILE).exists():
            print(f"# done, skipped: {workdir}", file=sys.stderr, flush=True)
            continue
        print(shlex.join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(workdir)
            print(f"# FAILED: {workdir}", file=sys.stderr, flush=True)
    if failed:
        print(f"# {len(failed)} run(s) failed:\n" + "\n".join(failed), file=sys.stderr)
    return 1 if failed else 0


def _csv(text: str | None, kind=str) -> list | None:
    return None if text is None else [kind(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = tool_cli.parser("experiments.paper_runs", __doc__)
    parser.add_argument("--tasks", help="comma-separated (default: Tables 1 and 2; "
                        "--low-resource: GLUE)")
    parser.add_argument("--methods", help=f"comma-separated (default: {','.join(METHODS)}; "
                        f"--low-resource: {','.join(paper.LOW_RESOURCE_METHODS)})")
    parser.add_argument("--workdir-root", default="runs/paper")
    parser.add_argument("--sweep", action="store_true", help="the paper's grid per method")
    parser.add_argument("--low-resource", action="store_true",
                        help="the grid on subsampled training sets (implies --sweep)")
    parser.add_argument("--train-sizes", help="low-resource sizes (default: "
                        f"{','.join(map(str, paper.LOW_RESOURCE_SIZES))}; implies "
                        "--low-resource)", type=tool_cli.csv_list(
                            int, lambda n: n > 0, "positive integers (training examples)",
                            "100,500"))
    parser.add_argument("--learning-rates", help="rates to try for every method (default: "
                        "each method's own)", type=tool_cli.csv_list(
                            float, lambda v: tool_cli.positive_finite(v, FLOAT32_MAX),
                            "positive finite learning rates", "3e-4,1e-3"))
    parser.add_argument("--dp-epsilons", help="target epsilons of differentially private runs "
                        "added to every configuration (implies --sweep)", type=tool_cli.csv_list(
                            float, tool_cli.positive_finite, "positive finite target epsilons",
                            "3,8"))
    parser.add_argument("--run", action="store_true", help="run them one after another")
    parser.add_argument("--json", action="store_true", help="print the grid as JSON")
    return parser


def grid_json(grid: Sweep, root: str, common: Sequence[str]) -> list[dict[str, Any]]:
    """The `--json` records of the grid's runs (with their data sizes and step counts)."""
    out = []
    for r in grid.runs:
        n_train, steps = run_steps(r, root, common)
        out.append({"task": r.task, "method": r.method, "name": r.name,
                    "workdir": r.workdir(root), "learning_rate": r.learning_rate,
                    "axes": dict(r.axes), "train_samples": r.train_samples,
                    "dp_epsilon": r.dp_epsilon,
                    "train_examples": n_train, "steps": steps,
                    "done": (Path(r.workdir(root)) / SUMMARY_FILE).exists(),
                    "command": r.command(root, common)})
    return out


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    low_resource = args.low_resource or args.train_sizes is not None
    tasks = _csv(args.tasks) or list(GLUE_TASKS if low_resource else GLUE_TASKS + SUPERGLUE_TASKS)
    methods = _csv(args.methods) or list(paper.LOW_RESOURCE_METHODS if low_resource
                                         else METHODS + paper.EXTRA_METHODS)

    # DP runs get workdirs of their own, named as the sweep names them.
    private = args.dp_epsilons or any(t.startswith("--config.dp.epsilon") for t in extra)
    if not (args.sweep or low_resource or private):  # one command per (task, method)
        try:  # names and flags checked before any command is printed or run
            split_extra(extra)
            for task in tasks:
                data_lib.get_task(task)  # raises naming the valid tasks
            for method in methods:
                peft.get_method(method)  # raises naming the registered methods
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        cmds = commands(tasks, methods, args.workdir_root, extra)
        for cmd in cmds:
            print(shlex.join(cmd))
            if args.run:
                subprocess.run(cmd, check=True)
        return 0

    try:
        passthrough = split_extra(extra)
        grid = sweep(tasks, methods, learning_rates=args.learning_rates,
                     train_sizes=(args.train_sizes or list(paper.LOW_RESOURCE_SIZES)
                                  if low_resource else None),
                     passthrough=passthrough, dp_epsilons=args.dp_epsilons)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in grid.skipped:
        print(f"# left out: {note}", file=sys.stderr)
    root, common = args.workdir_root, passthrough.common
    if args.json:
        print(json.dumps(grid_json(grid, root, common), indent=1))
        return 0
    if args.run:
        return run_all([(r.workdir(root), r.command(root, common)) for r in grid.runs])
    for r in grid.runs:
        print(shlex.join(r.command(root, common)))
    print(f"# {len(grid.runs)} runs", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
