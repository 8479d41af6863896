"""`PeftConfig`: what a PEFT method inserts into T5 and what it trains; presets of the paper.

Presets (spec §2-§4): full, adapter, pfeiffer, adapterdrop, lowrank, phm_adapter, compacter,
compacter++, bitfit, prompt_tuning, lora. `get_method("compacter++", reduction_factor=16)`
returns a preset with fields replaced. Model-dependent checks (n dividing the adapter sizes,
block indices) happen in `validate(config, d_model, num_layers)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from compacter_jax.peft import phm
from compacter_jax.peft.layers import PROJECTIONS, PROMPT_INITS

ADAPTER_POSITIONS = ("self_attention", "feed_forward")
STACKS = ("encoder", "decoder")
LORA_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head")


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """One PEFT method (frozen and hashable: it is part of the model's static structure).

    Adapters (projection is not None): one `Adapter` after each sublayer in `positions`
    ("self_attention", "feed_forward"; never cross-attention, spec §2) of the `stacks`, in
    blocks `i` with `i >= drop_first` and (`blocks is None` or `i in blocks`).
      projection: "dense" | "lowrank" | "phm" | "lphm"; bottleneck = d_model // reduction_factor.
      n: PHM dimension; rank: rank of the low-rank factors ("lowrank", "lphm").
      shared_rule: one PHM rule [n, n, n] for the whole model (Compacter), in `peft_root`.
      rule_init_std: std of the PHM rule init; None = spec §2 (1e-4 shared, 1e-2 own).
    train_layer_norms: also train every T5 layer-norm scale (the adapter methods, spec §3).
    prompt_length > 0: prompt tuning with that many soft tokens; prompt_init "uniform"
      (U(-prompt_init_range, +range)), "normal", or "vocab" (copy token-embedding rows
      `prompt_vocab_ids`, default 0..length-1 as the original code, after loading).
    lora_rank > 0: LoRA on the projections named in lora_targets (every attention/FF sublayer
      that has them), scale lora_alpha / lora_rank.
    bitfit: a zero-initialised bias beside every projection and the lm_head.
    train_all: full fine-tuning (every parameter trainable).
    """

    method: str = "custom"
    projection: str | None = None
    positions: tuple[str, ...] = ADAPTER_POSITIONS
    stacks: tuple[str, ...] = STACKS
    blocks: tuple[int, ...] | None = None
    drop_first: int = 0
    reduction_factor: int = 32
    n: int = 4
    rank: int = 1
    shared_rule: bool = False
    rule_init_std: float | None = None
    phm_path: str = "auto"
    train_layer_norms: bool = False
    prompt_length: int = 0
    prompt_init: str = "uniform"
    prompt_init_range: float = 0.5
    prompt_vocab_ids: tuple[int, ...] | None = None
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "v")
    bitfit: bool = False
    train_all: bool = False

    def __post_init__(self) -> None:
        for f in ("positions", "stacks", "blocks", "lora_targets", "prompt_vocab_ids"):
            object.__setattr__(self, f, _as_tuple(getattr(self, f)))
        if self.projection is not None and self.projection not in PROJECTIONS:
            raise ValueError(f"PeftConfig.projection={self.projection!r}; use one of "
                             f"{PROJECTIONS} or None")
        if "cross_attention" in self.positions:
            raise ValueError("PeftConfig.positions contains 'cross_attention': adapters never go "
                             "after decoder cross-attention (spec §2); use a subset of "
                             f"{ADAPTER_POSITIONS}")
        bad = [p for p in self.positions if p not in ADAPTER_POSITIONS]
        if bad:
            raise ValueError(f"PeftConfig.positions has unknown {bad}; use a subset of "
                             f"{ADAPTER_POSITIONS}")
        bad = [s for s in self.stacks if s not in STACKS]
        if bad:
            raise ValueError(f"PeftConfig.stacks has unknown {bad}; use a subset of {STACKS}")
        if self.blocks is not None and any(not isinstance(b, int) or b < 0 for b in self.blocks):
            raise ValueError(f"PeftConfig.blocks={self.blocks} must be non-negative block indices")
        for f in ("reduction_factor", "n", "rank"):
            if getattr(self, f) < 1:
                raise ValueError(f"PeftConfig.{f} must be >= 1, got {getattr(self, f)}")
        for f in ("drop_first", "prompt_length", "lora_rank"):
            if getattr(self, f) < 0:
                raise ValueError(f"PeftConfig.{f} must be >= 0, got {getattr(self, f)}")
        if self.shared_rule and self.projection not in ("phm", "lphm"):
            raise ValueError("PeftConfig.shared_rule=True needs projection 'phm' or 'lphm', got "
                             f"{self.projection!r}")
        if self.phm_path not in ("auto", "materialized", "factored"):
            raise ValueError(f"PeftConfig.phm_path={self.phm_path!r}; use 'auto', "
                             "'materialized' or 'factored'")
        if self.prompt_init not in PROMPT_INITS:
            raise ValueError(f"PeftConfig.prompt_init={self.prompt_init!r}; use one of "
                             f"{PROMPT_INITS}")
        if self.prompt_vocab_ids is not None and len(self.prompt_vocab_ids) != self.prompt_length:
            raise ValueError(f"PeftConfig.prompt_vocab_ids has {len(self.prompt_vocab_ids)} ids, "
                             f"prompt_length is {self.prompt_length}")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise ValueError(f"PeftConfig.lora_targets has unknown {bad}; use a subset of "
                             f"{LORA_TARGETS}")

    # -- derived ----------------------------------------------------------------------------
    @property
    def has_adapters(self) -> bool:
        return self.projection is not None and bool(self.positions) and bool(self.stacks)

    @property
    def uses_shared_rule(self) -> bool:
        return self.has_adapters and self.shared_rule

    @property
    def layer_dependent(self) -> bool:
        """True when adapters sit in some blocks only (cannot scan layers)."""
        return self.has_adapters and (self.drop_first > 0 or self.blocks is not None)

    def block_has_adapter(self, layer: int) -> bool:
        return layer >= self.drop_first and (self.blocks is None or layer in self.blocks)

    def replace(self, **changes: Any) -> "PeftConfig":
        return dataclasses.replace(self, **changes)


_ADAPTER = dict(train_layer_norms=True, reduction_factor=32)
PRESETS: dict[str, PeftConfig] = {
    "full": PeftConfig(method="full", train_all=True),
    "adapter": PeftConfig(method="adapter", projection="dense", **_ADAPTER),
    # One adapter per block; the original repo puts it after self-attention (spec §2).
    "pfeiffer": PeftConfig(method="pfeiffer", projection="dense", positions=("self_attention",),
                           **_ADAPTER),
    # Blocks 5-11 of the 12 of T5-base: the first 5 blocks of each stack have none.
    "adapterdrop": PeftConfig(method="adapterdrop", projection="dense", drop_first=5, **_ADAPTER),
    "lowrank": PeftConfig(method="lowrank", projection="lowrank", rank=1, **_ADAPTER),
    "phm_adapter": PeftConfig(method="phm_adapter", projection="phm", n=12, **_ADAPTER),
    "compacter": PeftConfig(method="compacter", projection="lphm", n=4, rank=1,
                            shared_rule=True, **_ADAPTER),
    "compacter++": PeftConfig(method="compacter++", projection="lphm", n=4, rank=1,
                              shared_rule=True, positions=("feed_forward",), **_ADAPTER),
    "bitfit": PeftConfig(method="bitfit", bitfit=True),
    "prompt_tuning": PeftConfig(method="prompt_tuning", prompt_length=100),
    "lora": PeftConfig(method="lora", lora_rank=8, lora_alpha=16.0, lora_targets=("q", "v")),
}

# Peak learning rates of the original configs (spec §5); LoRA is not in the paper.
RECOMMENDED_LR: dict[str, float] = {
    "full": 3e-4, "adapter": 3e-4, "pfeiffer": 3e-4, "adapterdrop": 3e-4, "bitfit": 3e-4,
    "lowrank": 3e-3, "phm_adapter": 3e-3, "compacter": 3e-3, "compacter++": 3e-3,
    "prompt_tuning": 3e-2, "lora": 1e-3,
}


def method_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_method(name: str, **overrides: Any) -> PeftConfig:
    """The preset `name` with `overrides` applied (dataclasses.replace; checks rerun)."""
    if name not in PRESETS:
        raise ValueError(f"unknown PEFT method {name!r}; valid names: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(PeftConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown PeftConfig field(s) {unknown} for method {name!r}; valid "
                         f"fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(PRESETS[name], **overrides)


def bottleneck_size(config: PeftConfig, d_model: int) -> int:
    return d_model // config.reduction_factor


def validate(config: PeftConfig, d_model: int, num_layers: int | None = None,
             vocab_size: int | None = None) -> None:
    """Checks `config` against the model sizes; ValueError naming the field and the fix."""
    if config.has_adapters:
        b = bottleneck_size(config, d_model)
        if b < 1:
            raise ValueError(f"reduction_factor={config.reduction_factor} leaves no bottleneck "
                             f"for d_model={d_model}; lower reduction_factor")
        if config.projection in ("phm", "lphm"):
            rank = config.rank if config.projection == "lphm" else None
            try:
                phm.check_phm_dims(d_model, b, config.n, rank)
            except ValueError as e:
                raise ValueError(f"{config.method}: adapter d_model={d_model} -> bottleneck {b} "
                                 f"(reduction_factor={config.reduction_factor}): {e}") from None
        if config.projection == "lowrank" and config.rank > b:
            raise ValueError(f"{config.method}: rank={config.rank} exceeds the bottleneck {b}; "
                             "lower `rank`")
        if num_layers is not None:
            if config.drop_first >= num_layers:
                raise ValueError(f"{config.method}: drop_first={config.drop_first} removes every "
                                 f"adapter of a {num_layers}-block stack; lower drop_first")
            if config.blocks is not None and any(i >= num_layers for i in config.blocks):
                raise ValueError(f"{config.method}: blocks={config.blocks} has indices beyond "
                                 f"the {num_layers} blocks of the model")
    if config.prompt_vocab_ids is not None and vocab_size is not None:
        if any(not 0 <= i < vocab_size for i in config.prompt_vocab_ids):
            raise ValueError(f"prompt_vocab_ids must lie in [0, vocab_size={vocab_size})")
