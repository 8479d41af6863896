r"""Predict a mixed-task JSONL file with one backbone and one adapter per task.

  python -m experiments.predict --backbone t5-base \
      --adapters rte=runs/rte/adapter,mrpc=runs/mrpc/adapter \
      --input in.jsonl --output out.jsonl

Each input line is a JSON object in the task registry's field names plus "task", e.g.
`{"task": "rte", "sentence1": "...", "sentence2": "..."}`; each output line is that object
with `prediction` (the generated text) and `parsed` (the task's label, or -1 when the text is
no valid label) added, in input order. Bad input (an unknown task, a task without an adapter,
adapters of different methods or backbones, a missing file, a malformed line) exits with code
2 and a message naming the task, the file and line, or the mismatch.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from compacter_jax.atomic import atomic_write
from compacter_jax.data import get_task
from compacter_jax.serve import Predictor, ServeError
from experiments import tool_cli


class InputError(ValueError):
    pass


def parse_adapters(text: str) -> dict[str, str]:
    """"rte=DIR,mrpc=DIR" -> {"rte": "DIR", "mrpc": "DIR"}."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        task, sep, path = item.partition("=")
        if not sep or not task.strip() or not path.strip():
            raise InputError(f"--adapters item {item!r} is not TASK=DIR (e.g. "
                             "--adapters rte=runs/rte/adapter,mrpc=runs/mrpc/adapter)")
        if task.strip() in out:
            raise InputError(f"--adapters gives task {task.strip()!r} twice")
        out[task.strip()] = path.strip()
    if not out:
        raise InputError("--adapters is empty: give TASK=DIR[,TASK=DIR...]")
    return out


def read_examples(path: Path) -> tuple[list[dict], list[int]]:
    """(examples, their line numbers) of a JSONL file (blank lines skipped)."""
    if not path.is_file():
        raise InputError(f"input file {path} not found")
    examples, lines = [], []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x} "
                                 f"at column {e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(example, dict):
                raise InputError(f"{path}:{number}: expected a JSON object, got "
                                 f"{type(example).__name__}")
            examples.append(example)
            lines.append(number)
    return examples, lines


def check_output(path: Path) -> None:
    """Refuses an --output that cannot be written (a directory, a device, a folder without
    write access), before any work; the folders it needs are created when it is written."""
    if path.is_dir():
        raise InputError(f"--output {path} is a directory: name the JSONL file to write "
                         f"(e.g. {path / 'predictions.jsonl'})")
    if path.exists() and not path.is_file():
        raise InputError(f"--output {path} exists and is not a regular file: name a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the first folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"--output {path}: {folder} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"--output {path}: cannot write in {folder} ({e.strerror}); choose "
                         "a writable folder") from None


def write_examples(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_tasks(path: Path, examples: list[dict], lines: list[int], adapters: dict) -> None:
    """Every example names a task that has an adapter (checked before the backbone loads)."""
    loaded = {}
    for name in adapters:
        try:
            loaded[get_task(name).name] = name
        except ValueError as e:
            raise InputError(f"--adapters {name}={adapters[name]}: {e}") from None
    for example, line in zip(examples, lines):
        if "task" not in example:
            raise InputError(f"{path}:{line}: no 'task' field (the adapter to use: one of "
                             f"{', '.join(adapters)})")
        try:
            task = get_task(example["task"]).name
        except ValueError as e:
            raise InputError(f"{path}:{line}: {e}") from None
        if task not in loaded:
            raise InputError(f"{path}:{line}: task {example['task']!r} has no adapter; "
                             f"--adapters gives {', '.join(adapters)}")


def run(args: argparse.Namespace) -> int:
    adapters = parse_adapters(args.adapters)
    check_output(Path(args.output))
    examples, lines = read_examples(Path(args.input))
    check_tasks(Path(args.input), examples, lines, adapters)
    predictor = Predictor(args.backbone or None, adapters, tokenizer=args.tokenizer or None,
                          batch_size=args.batch_size, dtype=args.dtype)
    try:
        rows = predictor.predict(examples)
    except ServeError as e:
        if e.index is None:
            raise
        raise InputError(f"{args.input}:{lines[e.index]}: {e}") from None
    write_examples(Path(args.output), rows)
    print(f"{len(rows)} predictions for tasks {', '.join(predictor.tasks)} -> {args.output}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = tool_cli.parser("experiments.predict", __doc__)
    p.add_argument("--backbone", default="", help="checkpoint dir, Hub id or "
                   "random:<preset> (default: the backbone the adapters record)")
    p.add_argument("--adapters", required=True, help="TASK=DIR[,TASK=DIR...] adapter exports")
    p.add_argument("--input", required=True, help="JSONL of examples with a 'task' field")
    p.add_argument("--output", required=True, help="JSONL to write (input order)")
    p.add_argument("--batch-size", type=tool_cli.positive_int, default=32,
                   help="examples per decoding batch (at most)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tokenizer", default="", help="tokenizer dir or Hub id (default: the "
                   "backbone's own spiece.model; the shared T5 vocabulary under "
                   "$COMPACTER_DATA_DIR/t5_vocab for a random: backbone)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return tool_cli.run(run, args)  # InputError, ServeError, AdapterFileError: ValueErrors


if __name__ == "__main__":
    sys.exit(main())
