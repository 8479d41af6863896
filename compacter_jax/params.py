"""Parameter report of the PEFT methods on a T5 model, without allocating any weights.

    python -m compacter_jax.params --model t5-base --method compacter++ [--json]
    python -m compacter_jax.params --model random:t5-base --method all
    python -m compacter_jax.params --model /path/to/checkpoint_dir --method all   (reads config.json)
    python -m compacter_jax.params --method compacter --set reduction_factor=16 --set n=8
    python -m compacter_jax.params --model t5-base --method bitfit --vocab 32100   (280,932)

Counts come from `jax.eval_shape` of the model's init. `percent` = trainable / backbone size,
where the backbone is every T5 weight of the checkpoint (embedding included, PEFT params
excluded): 222,903,552 for t5-base with its 32,128-row embedding. The paper divides by
222,882,048 (vocabulary resized to 32,100); both give the same rounded percentages (paper Table 1).
`--vocab 32100` counts the model as the original trains it, its vocabulary cut to the
tokenizer's 32,100 entries (`resize_token_embeddings`): BitFit's lm_head bias then has 32,100
entries, 280,932 trainable as in the paper (280,960 on the plain checkpoint).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import flax.traverse_util as traverse_util

from compacter_jax.models import PRESETS as T5_PRESETS
from compacter_jax.models import T5Config, is_backbone_path
from compacter_jax.models import param_shapes as model_param_shapes
from compacter_jax.models.config import parse_model_spec
from compacter_jax.models.vocab import check_vocab_size
from compacter_jax.peft import Method, build_model, cli_fields, count, get_method, method_names
from compacter_jax.peft.method import as_tuple, fits_type, type_name


# The paper's T5-base budget (Table 1): method -> (trainable parameters, % trained as
# printed, i.e. divided by PAPER_T5_BASE_DENOMINATOR). Counts include the 47,616 layer-norm
# scales that the adapter methods train.
PAPER_T5_BASE = {
    "adapter": (1_855_104, 0.832),
    "pfeiffer": (951_360, 0.427),
    "adapterdrop": (1_101_984, 0.494),
    "lowrank": (161_664, 0.073),
    "phm_adapter": (398_976, 0.179),
    "compacter": (161_728, 0.073),
    "compacter++": (104_704, 0.047),
    "prompt_tuning": (76_800, 0.034),
}
PAPER_T5_BASE_DENOMINATOR = 222_882_048  # the paper's T5-base, vocabulary resized to 32,100
T5_TOKENIZER_SIZE = 32_100  # len(T5Tokenizer): what the original resizes the vocabulary to


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Counts of one method on one model. percent = 100 * trainable / backbone."""

    method: str
    trainable: int
    peft: int          # parameters the method adds to the backbone
    total: int         # backbone + peft
    backbone: int
    percent: float


def resolve_model(spec: str) -> T5Config:
    """A T5Config from a preset name, `random:<preset>`, or a directory with config.json."""
    kind, where = parse_model_spec(spec)   # `random:` + an unknown preset: names the known
    if kind == "random":
        return T5_PRESETS[where]
    if spec in T5_PRESETS:                 # a preset's sizes: nothing is downloaded
        return T5_PRESETS[spec]
    cfg_file = Path(where) / "config.json"
    if kind in ("path", "shipped") and cfg_file.is_file():
        return T5Config.from_hf_dict(json.loads(cfg_file.read_text()))
    raise ValueError(f"--model {spec!r} is neither a preset ({', '.join(sorted(T5_PRESETS))}, "
                     "optionally prefixed 'random:') nor a directory holding config.json")


def param_shapes(t5_config: T5Config, method: Method) -> dict:
    """The param tree of T5 + method as ShapeDtypeStructs (no memory allocated)."""
    return model_param_shapes(build_model(t5_config, method))


def report(t5_config: T5Config, method: Method) -> ParamReport:
    shapes = param_shapes(t5_config, method)
    flat = traverse_util.flatten_dict(shapes)
    sizes = {p: count(v) for p, v in flat.items()}
    backbone = sum(n for p, n in sizes.items() if is_backbone_path(p))
    total = sum(sizes.values())
    # The method's own count (Intrinsic-SAID's trainable vector is not in the model's tree).
    trainable = method.trainable_count(shapes)
    return ParamReport(method=method.name, trainable=trainable, peft=total - backbone,
                       total=total, backbone=backbone, percent=100.0 * trainable / backbone)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["n=8", "positions=('feed_forward',)"] -> {"n": 8, ...} (Python literals, else str).

    Raises ValueError naming the item for one that is not FIELD=VALUE, and naming the field
    and its type for a value of the wrong type (a field of any registered method)."""
    out: dict[str, Any] = {}
    types = cli_fields()
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key] = as_tuple(ast.literal_eval(value))
        except (ValueError, SyntaxError):
            out[key] = value
        if key in types and not fits_type(out[key], types[key]):
            raise ValueError(f"--set {item}: field {key!r} takes {type_name(types[key])}, "
                             f"not {out[key]!r}")
    return out


def format_table(rows: list[ParamReport], skipped: dict[str, str]) -> str:
    width = max([len("method"), *(len(r.method) for r in rows)])
    head = f"{'method':<{width}} {'trainable':>13} {'total':>13} {'% of backbone':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:<{width}} {r.trainable:>13,} {r.total:>13,} {r.percent:>14.3f}")
    if rows:
        lines.append(f"backbone: {rows[0].backbone:,} parameters (percent denominator)")
    for name, why in skipped.items():
        lines.append(f"{name}: not applicable to this model ({why})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Trainable/total parameters of PEFT methods on T5.")
    ap.add_argument("--model", default="t5-base",
                    help="preset (t5-base, random:t5-base, ...) or checkpoint dir with config.json")
    ap.add_argument("--method", default="all", help=f"'all' or one of: {', '.join(method_names())}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a field of every method (repeatable)")
    ap.add_argument("--vocab", type=int, default=None, metavar="N",
                    help="cut the vocabulary to its first N entries first, as the original's "
                         "resize_token_embeddings(len(tokenizer)) (T5: 32100)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    rows: list[ParamReport] = []
    skipped: dict[str, str] = {}   # with --method all: presets whose sizes do not fit the model
    try:
        overrides = parse_overrides(args.set)
        t5_config = resolve_model(args.model)
        if args.vocab is not None:
            check_vocab_size(t5_config, args.vocab)
            t5_config = t5_config.replace(vocab_size=args.vocab)
        if args.method != "all":
            rows.append(report(t5_config, get_method(args.method, **overrides)))
        else:
            for name in method_names():
                try:
                    rows.append(report(t5_config, get_method(name, **overrides)))
                except ValueError as e:
                    skipped[name] = str(e)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out = [dataclasses.asdict(r) for r in rows]
        print(json.dumps({"model": args.model, "methods": out, "skipped": skipped}, indent=1))
    else:
        print(format_table(rows, skipped))
    return 0


if __name__ == "__main__":
    sys.exit(main())
