"""What the helper tools share (`by_length`, `paper_runs`, `paper_table`, `predict`, `probe`,
`small_scale`, `train_tokenizer`): argparse, a user's mistake as one `error:` line and exit
code 2, and comma-separated list flags checked as they are parsed (argparse then names the
flag).

The training CLIs (`glue`, `multitask`, `pretrain`) parse ml_collections configs with absl
(`experiments.cli`); a helper tool takes a few plain flags, so argparse is enough. The exit-2
rule is the same for both: `experiments.cli.USER_ERRORS`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from experiments.cli import USER_ERRORS


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser for `python -m MODULE`, its help the module's docstring as written."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def run(body: Callable[..., int], *args: Any, errors: Sequence[type] = ()) -> int:
    """`body(*args)`'s exit code; 2, with the error on one `error:` line, when it raises one
    of USER_ERRORS or `errors` (a user's mistake: bad value, missing or unusable file)."""
    try:
        return body(*args)
    except (*USER_ERRORS, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def csv_list(kind: Callable[[str], Any], ok: Callable[[Any], bool], want: str,
             example: str) -> Callable[[str], list]:
    """An argparse `type` for "A,B,C": each item converted by `kind` and accepted by `ok`.

    Args:
      kind: int or float (or any str -> value converter raising ValueError).
      ok: the check every value must pass.
      want: what a value must be, for the message ("positive integers").
      example: a valid value of the flag ("100,500").
    Returns:
      The converter (an empty string gives [], the tool's default); it raises argparse.ArgumentTypeError naming the bad item, what is
      wanted and an example (argparse adds the flag's name and exits with code 2).
    """
    def convert(text: str) -> list:
        values = []
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            try:
                value = kind(item)
            except ValueError:
                value = None
            if value is None or not ok(value):
                raise argparse.ArgumentTypeError(
                    f"{item!r} is not valid: expected comma-separated {want} (e.g. {example})")
            values.append(value)
        return values  # "" -> []: the flag's default

    return convert


def positive_int(text: str) -> int:
    """An argparse `type`: a positive integer, else an error argparse names the flag in."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    """An argparse `type`: a positive finite number, else an error argparse names the flag in."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not positive_finite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def positive_finite(value: float, limit: float = float("inf")) -> bool:
    """0 < value <= limit and finite."""
    return math.isfinite(value) and 0 < value <= limit
