"""The presets: every method of the paper's Table 1 (and LoRA) as one `Method` instance.

`get_method("compacter++", reduction_factor=16)` returns a preset with fields replaced.
Learning rates are the original configs' (paper §5); LoRA is not in the paper.
"""

from __future__ import annotations

from typing import Any

from compacter_jax.peft.method import Method
from compacter_jax.peft.methods import (AdapterMethod, AttemptMethod, BitFitMethod, DSEEMethod,
                                        FullFineTuning, IntrinsicSAID, LoRAMethod, PromptTuning)
from compacter_jax.peft.methods.lst import LadderSideTuning

_ADAPTERS = dict(train_layer_norms=True, reduction_factor=32)

PRESETS: dict[str, Method] = {p.name: p for p in (
    FullFineTuning(name="full", learning_rate=3e-4),
    AdapterMethod(name="adapter", projection="dense", learning_rate=3e-4, **_ADAPTERS),
    # One adapter per block; the original repo puts it after self-attention.
    AdapterMethod(name="pfeiffer", projection="dense", positions=("self_attention",),
                  learning_rate=3e-4, **_ADAPTERS),
    # Blocks 5-11 of the 12 of T5-base: the first 5 blocks of each stack have none.
    AdapterMethod(name="adapterdrop", projection="dense", drop_first=5, learning_rate=3e-4,
                  **_ADAPTERS),
    AdapterMethod(name="lowrank", projection="lowrank", rank=1, learning_rate=3e-3, **_ADAPTERS),
    AdapterMethod(name="phm_adapter", projection="phm", n=12, learning_rate=3e-3, **_ADAPTERS),
    AdapterMethod(name="compacter", projection="lphm", n=4, rank=1, shared_rule=True,
                  learning_rate=3e-3, **_ADAPTERS),
    AdapterMethod(name="compacter++", projection="lphm", n=4, rank=1, shared_rule=True,
                  positions=("feed_forward",), learning_rate=3e-3, **_ADAPTERS),
    BitFitMethod(name="bitfit", learning_rate=3e-4),
    PromptTuning(name="prompt_tuning", length=100, init="uniform", learning_rate=3e-2),
    LoRAMethod(name="lora", rank=8, alpha=16.0, targets=("q", "v"), learning_rate=1e-3),
    BitFitMethod(name="bitfit_projections", layer_norms=False, learning_rate=3e-4),
    PromptTuning(name="prompt_tuning_vocab", length=100, init="vocab", learning_rate=3e-1),
    IntrinsicSAID(name="intrinsic_said", dim=20_000, said=True, learning_rate=3e-2),
    # Ladder Side-Tuning (Sung et al. 2022): r = 8, side blocks 1-3, 5-7, 9-11 of T5-base,
    # lr 3e-3 (the authors' scripts/ladder_side_tuning_base.sh).
    LadderSideTuning(name="lst", reduction_factor=8, drop_every=4, learning_rate=3e-3),
    # Source prompts: set `sources` (prompt-tuning exports); lr 3e-1 as the original configs.
    AttemptMethod(name="attempt", length=100, attn_dim=100, learning_rate=3e-1),
    # SparseAdapter (He et al. 2022): Houlsby adapters 40% pruned by SNIP at init, and
    # "Large-Sparse": twice the bottleneck, 50% pruned: the dense adapter's weight budget.
    AdapterMethod(name="sparse_adapter", projection="dense", sparsity=0.4, prune="snip",
                  learning_rate=3e-4, **_ADAPTERS),
    AdapterMethod(name="large_sparse_adapter", projection="dense", sparsity=0.5, prune="snip",
                  learning_rate=3e-4, **{**_ADAPTERS, "reduction_factor": 16}),
    # DSEE (Chen et al. 2021): low-rank + 16-entry sparse updates of q and v (authors' GLUE
    # scripts: rank 16, alpha 32, lr 2e-4 to 6e-4).
    DSEEMethod(name="dsee", rank=16, alpha=32.0, num_sparse=16, targets=("q", "v"),
               learning_rate=5e-4),
)}


def method_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_method(name: str | Method, **overrides: Any) -> Method:
    """The preset `name` (or a Method) with `overrides` of its fields applied (checks rerun).

    Raises ValueError listing the valid names for an unknown preset, and naming the field (and
    the method's valid fields) for an unknown override.
    """
    if isinstance(name, Method):
        return name.replace(**overrides) if overrides else name
    if name not in PRESETS:
        raise ValueError(f"unknown PEFT method {name!r}; valid names: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def cli_fields() -> dict[str, Any]:
    """Every method field a preset may be overridden with -> its annotated type (the union
    over the registered families; `--config.peft.<field>`). Raises if two families give one
    name different types."""
    out: dict[str, Any] = {}
    for family in sorted({type(m) for m in PRESETS.values()}, key=lambda c: c.__name__):
        for field, kind in family.field_types().items():
            if field in out and out[field] != kind:
                raise TypeError(f"field {field!r} has type {out[field]} in one method family and "
                                f"{kind} in {family.__name__}: rename one of them")
            out[field] = kind
    return out


def _plain_type(annotation: Any) -> type:
    """int | None -> int, tuple[str, ...] -> tuple, Literal[...] / str -> str."""
    import types  # noqa: PLC0415
    import typing  # noqa: PLC0415

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _plain_type(args[0])
    if origin is tuple or annotation is tuple:
        return tuple
    return annotation if isinstance(annotation, type) else str


def cli_placeholder_types() -> dict[str, type]:
    """`cli_fields()` with each annotation as the plain type a config placeholder takes (int,
    float, bool, str or tuple): what `experiments/configs/glue.py` declares `peft.*` with."""
    return {name: _plain_type(kind) for name, kind in cli_fields().items()}
