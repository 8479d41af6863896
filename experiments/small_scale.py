"""The paper's comparison at small scale, on the T5 pretrained here (checkpoints/t5-mini-glue):

    python -m experiments.small_scale --run              # every run (skips finished ones)
    python -m experiments.small_scale --report           # tables + figure from finished runs
    python -m experiments.small_scale                    # print the commands only

Three groups of runs, each an `experiments.glue` run with the paper's recipe (configs/glue.py
:paper: the method's learning rate, AdamW, linear warm-up and decay, clipping 1.0) except for
the caps a 2-core CPU needs (`--steps`, `--batch`, warm-up 10% of the steps) and
`--lr-scale`, which multiplies the rate of the methods the embedded backbone's default scale
is for (`experiments.spec.finetune.backbone_scale_applies`: every frozen-backbone method
whose paper rate is below 3e-2; full fine-tuning and prompt tuning keep the paper's): on the
256-wide t5-mini-glue the adapters need about 10x the paper's rates to leave the label prior
within a few thousand steps (docs/small_scale.md). `--tasks`,
`--methods` and `--sizes` select a slice of the grid; `--seeds` repeats it (training seeds:
initialisation, dropout, data order; the splits and subsamples keep the data seed):

* main: full fine-tuning, Adapter, Pfeiffer, Adapter-LowRank, PHM-Adapter, Compacter,
  Compacter++, BitFit, prompt tuning and LoRA, SparseAdapter (and Large-Sparse) and DSEE on
  SST-2, MRPC, CoLA, STS-B and RTE;
* low_resource: full fine-tuning and Compacter++ with 100 / 500 / 1000 / 2000 / 4000 training
  examples (the original's subsamples) on SST-2 and STS-B;
* control: the same runs as `main` for full fine-tuning and Compacter++ on a randomly
  initialised T5 of the same shape and the backbone's tokenizer (saved once under
  WORKDIR_ROOT/random-backbone).

`--report` writes, for each group and backbone, the tables of `experiments.paper_table`
(test scores at the best validation checkpoint; with several seeds, the seed with the best
validation score) and `seeds.md` / `seeds.csv` (mean and standard deviation over the seeds of
the validation and test scores) under `--out` (default docs/small_scale/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import jax
import numpy as np

from compacter_jax import peft
from compacter_jax.atomic import atomic_write
from compacter_jax.models import (T5Config, T5ForConditionalGeneration, init_params,
                                  save_pretrained)
from experiments import paper_table, run_results, tool_cli
from experiments.configs import glue as glue_config
from experiments.paper_runs import run_all
from experiments.spec.finetune import backbone_scale_applies
from experiments.train_tokenizer import SPIECE

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "checkpoints" / "t5-mini-glue"
METHODS = ("full", "adapter", "pfeiffer", "lowrank", "phm_adapter", "compacter", "compacter++",
           "bitfit", "prompt_tuning", "lora", "lst", "sparse_adapter", "large_sparse_adapter",
           "dsee")
TASKS = ("sst2", "mrpc", "cola", "stsb", "rte")
# SST-2 and STS-B: the two tasks on which both methods learn on t5-mini-glue with all the data
# (on MRPC, CoLA and RTE they stay at or near the majority label; docs/small_scale.md).
LOW_RESOURCE_TASKS = ("sst2", "stsb")
LOW_RESOURCE_SIZES = (100, 500, 1000, 2000, 4000)
LOW_RESOURCE_METHODS = ("full", "compacter++")
CONTROL_METHODS = ("full", "compacter++")
RANDOM_BACKBONE = "random-backbone"  # the control's backbone, under --workdir-root
# d_model 256 is not divisible by the paper's n = 12 for PHM-Adapter: the nearest divisor.
METHOD_FLAGS = {"phm_adapter": ["--config.peft.n=8"]}
# The recipe's own training seed: its runs keep the seed-less workdir (the grid's first seed).
DEFAULT_SEED = glue_config.get_config("paper").seed


def random_backbone(backbone: Path, root: Path, seed: int = 0) -> Path:
    """A randomly initialised T5 with `backbone`'s config.json and tokenizer (its
    spiece.model, when it has one), saved once under `root`."""
    out = root / RANDOM_BACKBONE
    if not (out / "model.safetensors").is_file():
        config = T5Config.from_hf_dict(json.loads((backbone / "config.json").read_text()))
        model = T5ForConditionalGeneration(config)
        save_pretrained(out, config, init_params(model, jax.random.PRNGKey(seed)))
    if (backbone / SPIECE).is_file() and not (out / SPIECE).is_file():
        atomic_write(out / SPIECE, (backbone / SPIECE).read_bytes())  # no torn tokenizer
    return out


def _command(workdir: Path, model: Path, task: str, method: str, args,
             train_samples: int | None = None, seed: int = DEFAULT_SEED) -> tuple[str, list[str]]:
    if seed != DEFAULT_SEED:
        workdir = workdir / f"seed{seed}"
    flags = [f"--config.model={model}", "--config.fallback_model=", f"--config.task={task}",
             f"--config.method={method}", "--config.source=files",
             f"--config.max_steps={args.steps}", f"--config.batch_size={args.batch}",
             f"--config.eval_batch_size={args.eval_batch}",
             f"--config.warmup_steps={max(1, args.steps // 10)}",
             f"--config.eval_every={max(1, args.steps // 2)}", "--config.log_every=20",
             *METHOD_FLAGS.get(method, [])]
    preset = peft.get_method(method)
    if args.lr_scale != 1.0 and backbone_scale_applies(preset, preset.learning_rate):
        flags.append(f"--config.learning_rate_scale={args.lr_scale}")
    if train_samples:
        flags.append(f"--config.train_samples={train_samples}")
    if seed != DEFAULT_SEED:
        flags.append(f"--config.seed={seed}")
    cmd = [sys.executable, "-m", "experiments.glue", "--config",
           f"{ROOT / 'experiments' / 'configs' / 'glue.py'}:paper", "--workdir", str(workdir),
           *flags]
    return str(workdir), cmd


def plan(args) -> list[tuple[str, list[str]]]:
    """(workdir, command) of every run of the selected groups."""
    root, backbone = Path(args.workdir_root), Path(args.backbone)
    control = root / RANDOM_BACKBONE
    cmds = []
    for seed in args.seeds:
        if "main" in args.groups:
            cmds += [_command(root / "main" / task / method, backbone, task, method, args,
                              seed=seed)
                     for task in args.tasks for method in args.methods]
        if "low_resource" in args.groups:
            cmds += [_command(root / "low_resource" / task / method / f"train{n}", backbone,
                              task, method, args, n, seed)
                     for task in LOW_RESOURCE_TASKS if task in args.tasks
                     for method in LOW_RESOURCE_METHODS if method in args.methods
                     for n in args.sizes]
        if "control" in args.groups:
            cmds += [_command(root / "control" / task / method, control, task, method, args,
                              seed=seed)
                     for task in args.tasks for method in CONTROL_METHODS
                     if method in args.methods]
    return cmds


def report(args) -> dict[str, Path]:
    """The tables and the figure of every group with finished runs."""
    root, out, written = Path(args.workdir_root), Path(args.out), {}
    for group in args.groups:
        if not (root / group).is_dir():
            continue
        runs, unreadable = run_results.read_runs(root / group)
        for why in unreadable:
            print(f"warning: left out (shown as missing): {why}", file=sys.stderr)
        if runs:
            files = paper_table.write_all(runs, out / group, unreadable, runs_root=root / group)
            records = seed_records(runs)
            files["seeds.csv"] = paper_table.write_csv(out / group / "seeds.csv", records)
            files["seeds.md"] = atomic_write(out / group / "seeds.md", seeds_markdown(records))
            written.update({f"{group}/{k}": v for k, v in files.items()})
    return written


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def seed_records(runs) -> list[dict]:
    """One record per (task, method, training examples, backbone): the number of seeds and
    the mean and sample standard deviation of their validation and test scores (the test
    score as `paper_table`: the task's metrics averaged, at each run's best validation step).
    Runs never evaluated are left out."""
    groups: dict[tuple, list] = {}
    for run in runs:
        if run.validation_score is not None and run.test_score is not None:
            key = (run.task, run.method, run.train_samples or 0, run.model)
            groups.setdefault(key, []).append(run)
    records = []
    for (task, method, n, model), members in sorted(groups.items()):
        val_mean, val_sd = _mean_sd([r.validation_score for r in members])
        test_mean, test_sd = _mean_sd([r.test_score for r in members])
        records.append({
            "task": task, "method": method, "train_samples": n or "", "model": model,
            "seeds": ",".join(str(r.run_config.get("seed", "")) for r in members),
            "n": len(members), "validation_mean": val_mean, "validation_sd": val_sd,
            "test_mean": test_mean, "test_sd": test_sd})
    return records


def seeds_markdown(records) -> str:
    """The records as a markdown table (mean ± sample sd; sd blank for a single seed)."""
    def cell(mean, sd):
        return f"{mean:.1f}" + (f" ± {sd:.1f}" if sd is not None else "")
    lines = ["| task | method | train examples | backbone | seeds | validation | test |",
             "|---|---|---:|---|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['method']} | {r['train_samples'] or 'all'} | "
              f"{Path(r['model']).name} | {r['seeds']} | "
              f"{cell(r['validation_mean'], r['validation_sd'])} | "
              f"{cell(r['test_mean'], r['test_sd'])} |" for r in records]
    return ("Mean ± sample standard deviation over the training seeds (validation: each run's "
            "best validation score; test: at that step).\n\n" + "\n".join(lines) + "\n")


GROUPS = ("main", "low_resource", "control")


def build_parser() -> argparse.ArgumentParser:
    p = tool_cli.parser("experiments.small_scale", __doc__)
    p.add_argument("--backbone", default=str(BACKBONE), help="pretrained HF-format T5 directory")
    p.add_argument("--workdir-root", default="runs/small_scale")
    p.add_argument("--groups", default="main,low_resource,control",
                   type=tool_cli.csv_list(str, GROUPS.__contains__,
                                          f"groups of {', '.join(GROUPS)}", "main,control"))
    p.add_argument("--steps", type=tool_cli.positive_int, default=200,
                   help="steps per run (the cap)")
    p.add_argument("--batch", type=tool_cli.positive_int, default=32)
    p.add_argument("--lr-scale", type=tool_cli.positive_float, default=1.0,
                   help="multiplies the paper's rate of the frozen-backbone methods below 3e-2")
    p.add_argument("--tasks", default=",".join(TASKS),
                   type=tool_cli.csv_list(str, TASKS.__contains__,
                                          f"tasks of {', '.join(TASKS)}", "sst2,rte"))
    p.add_argument("--methods", default=",".join(METHODS),
                   type=tool_cli.csv_list(str, METHODS.__contains__,
                                          f"methods of {', '.join(METHODS)}", "full,compacter++"))
    p.add_argument("--sizes", default=",".join(map(str, LOW_RESOURCE_SIZES)),
                   type=tool_cli.csv_list(int, lambda n: n > 0, "positive integers",
                                          "100,500"),
                   help="training examples of the low_resource group")
    p.add_argument("--seeds", default=str(DEFAULT_SEED),
                   type=tool_cli.csv_list(int, lambda n: 0 <= n < 2**32,
                                          "unsigned 32-bit integers", "42,1,2"),
                   help="training seeds (the recipe's own, first, keeps the seed-less workdir)")
    p.add_argument("--eval-batch", type=tool_cli.positive_int, default=100)
    p.add_argument("--run", action="store_true", help="run the commands (finished ones skip)")
    p.add_argument("--report", action="store_true", help="write the tables and the figure")
    p.add_argument("--out", default=str(ROOT / "docs" / "small_scale"))
    return p


def run(args: argparse.Namespace) -> int:
    if not Path(args.backbone, "config.json").is_file():
        raise FileNotFoundError(f"--backbone {args.backbone} has no config.json (pretrain it "
                                "first: python -m experiments.pretrain, see "
                                "checkpoints/t5-mini-glue/README.md)")
    if "control" in args.groups:
        random_backbone(Path(args.backbone), Path(args.workdir_root))
    cmds = plan(args)
    if not args.run and not args.report:
        for _, cmd in cmds:
            print(shlex.join(cmd))
    status = run_all(cmds) if args.run else 0
    if args.report:
        for name, path in report(args).items():
            print(f"wrote {path}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    return tool_cli.run(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
