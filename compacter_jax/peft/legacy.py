"""Methods from their JSON records, including exports written before `Method` existed.

Today's record is `Method.to_dict()`: {"family": "AdapterMethod", "name": ..., fields...}.
Exports of compacter-jax 0.1 stored one flat `PeftConfig` (every field of every method, the
active ones telling which method it was); `method_from_dict` maps those onto today's families
with the same parameters, so their adapters still load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from compacter_jax.peft import methods
from compacter_jax.peft.method import Method
from compacter_jax.peft.registry import PRESETS


def families() -> dict[str, type[Method]]:
    """Family (class) name -> class, for every family that has a preset in the registry."""
    return {type(m).__name__: type(m) for m in PRESETS.values()} | {"Method": Method}


def method_from_dict(record: Mapping[str, Any]) -> Method:
    """The Method a JSON record describes (today's layout or the 0.1 `PeftConfig` one)."""
    record = dict(record)
    if "family" in record:
        family = record.pop("family")
        known = families()
        if family not in known:
            raise ValueError(f"unknown method family {family!r}; known: {sorted(known)}")
        cls = known[family]
        unknown = sorted(set(record) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for {family}; valid: "
                             f"{', '.join(cls.field_names())}")
        return cls(**record)
    return _from_peft_config(record)


def _lr(name: str, default: float) -> float:
    return PRESETS[name].learning_rate if name in PRESETS else default


def _from_peft_config(d: dict[str, Any]) -> Method:
    """compacter-jax 0.1 `PeftConfig` fields -> today's method with the same parameters."""
    if "train_all" not in d and "projection" not in d:
        raise ValueError(f"not a method record (no 'family'; fields {sorted(d)[:8]})")
    name = d.get("method", "custom")
    if d.get("train_all"):
        return methods.FullFineTuning(name=name, learning_rate=_lr(name, 3e-4))
    if d.get("bitfit"):  # 0.1's BitFit had no layer-norm biases
        return methods.BitFitMethod(name="bitfit_projections", layer_norms=False,
                                    learning_rate=_lr("bitfit_projections", 3e-4))
    if d.get("prompt_length", 0) > 0:
        return methods.PromptTuning(
            name=name, length=d["prompt_length"], init=d.get("prompt_init", "uniform"),
            init_range=d.get("prompt_init_range", 0.5), vocab_ids=d.get("prompt_vocab_ids"),
            learning_rate=_lr(name, 3e-2))
    if d.get("lora_rank", 0) > 0:
        return methods.LoRAMethod(name=name, rank=d["lora_rank"], alpha=d.get("lora_alpha", 16.0),
                                  targets=d.get("lora_targets", ("q", "v")),
                                  learning_rate=_lr(name, 1e-3))
    if d.get("projection") is not None:
        keep = ("projection", "positions", "stacks", "blocks", "drop_first", "reduction_factor",
                "n", "rank", "shared_rule", "rule_init_std", "phm_path", "train_layer_norms")
        return methods.AdapterMethod(name=name, learning_rate=_lr(name, 3e-4),
                                     **{k: d[k] for k in keep if k in d})
    return Method(name=name)
