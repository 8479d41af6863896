"""LoRA (Hu et al. 2021): a trainable low-rank update (alpha / rank) * x A B beside frozen
projections. Not in the Compacter paper; a common baseline."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from compacter_jax.models import Site, T5Config, T5Hooks
from compacter_jax.peft import layers
from compacter_jax.peft import sparsity as sparsity_lib
from compacter_jax.peft.method import Method, as_tuple

TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head")


@dataclasses.dataclass(frozen=True)
class LoRAMethod(Method):
    """Attributes:
      rank: rank r of the update; alpha: its scale is alpha / rank.
      targets: projections that get an update, in every self-attention, cross-attention and
        feed-forward sublayer that has them (and the lm_head if listed). Parameters:
        `{projection}_delta/{lora_a [in, r], lora_b [r, out]}`; B starts at zero.
      sparsity, prune: SparseAdapter pruning of A and B at initialisation
        (`peft/sparsity.py`); 0 = dense.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    sparsity: float = 0.0
    prune: str = "snip"

    task_prefix: ClassVar[bool] = False  # per-task modules, like adapters

    def __post_init__(self) -> None:
        super().__post_init__()
        sparsity_lib.check(self.sparsity, self.prune, self.name)
        object.__setattr__(self, "targets", as_tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"{self.name}: rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"{self.name}: targets has unknown {bad}; use a non-empty subset of "
                             f"{TARGETS}")

    def trainable_count(self, params) -> int:
        """Trainable non-zeros: with `sparsity`, the pruned weights are not counted."""
        self.check_params(params)   # a tree that is not this method's T5 is an error
        return sparsity_lib.kept_count(params, self.is_trainable, self.sparsity)

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return LoRAHooks(self, dtype)

    def validate(self, t5: T5Config) -> None:
        gated = {"wi_0", "wi_1"} & set(self.targets)
        if gated and not t5.is_gated:
            raise ValueError(f"{self.name}: targets {sorted(gated)} exist only in gated-GELU "
                             "(v1.1) T5s; use 'wi' for this model")
        if "wi" in self.targets and t5.is_gated:
            raise ValueError(f"{self.name}: target 'wi' does not exist in a gated-GELU (v1.1) T5; "
                             "use 'wi_0' and/or 'wi_1'")


@dataclasses.dataclass(frozen=True)
class LoRAHooks(T5Hooks):
    method: LoRAMethod
    dtype: str | None = None

    def projection_delta(self, site: Site, projection: str, in_features: int,
                         out_features: int, name: str) -> nn.Module | None:
        m = self.method
        if projection not in m.targets:
            return None
        return layers.LoRA(out_features, rank=m.rank, alpha=m.alpha, dtype=self.dtype, name=name)
