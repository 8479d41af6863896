"""The bottleneck-adapter family: Adapter, Pfeiffer, AdapterDrop, Adapter-LowRank,
PHM-Adapter, Compacter and Compacter++ (paper §2-3; presets in `peft/registry.py`).

Placement: one `Adapter` on the output of each sublayer in `positions` ("self_attention",
"feed_forward"; never decoder cross-attention) of the `stacks`, in blocks `i >= drop_first`
and (`blocks is None` or `i in blocks`), before T5's dropout and residual. Compacter's one
shared PHM rule [n, n, n] lives at the model root (`peft_root/phm_rule`) and is passed to
every PHM projection. The adapters, the shared rule and (with `train_layer_norms`, as the
paper) all T5 layer-norm scales are trained.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn

from compacter_jax.models import Site, T5Config, T5Hooks
from compacter_jax.peft import layers, phm
from compacter_jax.peft import sparsity as sparsity_lib
from compacter_jax.peft.method import Method, ParamPath, as_tuple, is_layer_norm_path, is_peft_path

ADAPTER_POSITIONS = ("self_attention", "feed_forward")
STACKS = ("encoder", "decoder")


@dataclasses.dataclass(frozen=True)
class AdapterMethod(Method):
    """Bottleneck adapters h -> h + up(gelu(down(h))), down: d_model -> d_model/reduction_factor.

    Attributes:
      projection: "dense" (Houlsby/Pfeiffer/AdapterDrop), "lowrank" (rank-`rank` W = s t),
        "phm" (PHM-Adapter: full B, own rule per layer) or "lphm" (Compacter: B_i = s_i t_i).
      positions / stacks / blocks / drop_first: where adapters go (module docstring).
      reduction_factor: bottleneck = d_model // reduction_factor.
      n: PHM dimension; rank: rank of the low-rank factors ("lowrank", "lphm").
      shared_rule: one PHM rule for the whole model (Compacter), at `peft_root/phm_rule`.
      rule_init_std: std of the PHM rule init; None = 1e-4 when shared, 1e-2 when own.
      phm_path: "auto" | "materialized" | "factored" (see `phm.phm_matmul`).
      train_layer_norms: also train every T5 layer-norm scale (the paper's adapter methods).
      sparsity, prune: SparseAdapter (`peft/sparsity.py`): this fraction of the adapter
        weights (kernels, low-rank and PHM factors) pruned at initialisation by criterion
        `prune` and kept at zero through training; 0 = dense.
    """

    projection: str = "dense"
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
    train_layer_norms: bool = True
    sparsity: float = 0.0
    prune: str = "snip"

    task_prefix: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        sparsity_lib.check(self.sparsity, self.prune, self.name)
        for f in ("positions", "stacks", "blocks"):
            object.__setattr__(self, f, as_tuple(getattr(self, f)))
        if self.projection not in layers.PROJECTIONS:
            raise ValueError(f"{self.name}: projection={self.projection!r}; use one of "
                             f"{layers.PROJECTIONS}")
        if "cross_attention" in self.positions:
            raise ValueError(f"{self.name}: positions contains 'cross_attention': adapters never go "
                             "after decoder cross-attention (paper §2); use a subset of "
                             f"{ADAPTER_POSITIONS}")
        bad = [p for p in self.positions if p not in ADAPTER_POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"{self.name}: positions has unknown {bad}; use a non-empty subset "
                             f"of {ADAPTER_POSITIONS}")
        bad = [s for s in self.stacks if s not in STACKS]
        if bad or not self.stacks:
            raise ValueError(f"{self.name}: stacks has unknown {bad}; use a non-empty subset of "
                             f"{STACKS}")
        if self.blocks is not None and any(not isinstance(b, int) or b < 0 for b in self.blocks):
            raise ValueError(f"{self.name}: blocks={self.blocks} must be non-negative block indices")
        for f in ("reduction_factor", "n", "rank"):
            if getattr(self, f) < 1:
                raise ValueError(f"{self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if self.drop_first < 0:
            raise ValueError(f"{self.name}: drop_first must be >= 0, got {self.drop_first}")
        if self.shared_rule and self.projection not in ("phm", "lphm"):
            raise ValueError(f"{self.name}: shared_rule=True needs projection 'phm' or 'lphm', got "
                             f"{self.projection!r}")
        if self.phm_path not in ("auto", "materialized", "factored"):
            raise ValueError(f"{self.name}: phm_path={self.phm_path!r}; use 'auto', "
                             "'materialized' or 'factored'")

    # -- placement -------------------------------------------------------------------------
    @property
    def layer_dependent(self) -> bool:
        """True when adapters sit in some blocks only (the layers cannot be scanned)."""
        return self.drop_first > 0 or self.blocks is not None

    def block_has_adapter(self, layer: int) -> bool:
        return layer >= self.drop_first and (self.blocks is None or layer in self.blocks)

    def bottleneck(self, d_model: int) -> int:
        return d_model // self.reduction_factor

    def trainable_count(self, params) -> int:
        """Trainable non-zeros: with `sparsity`, the pruned weights are not counted."""
        self.check_params(params)   # a tree that is not this method's T5 is an error
        return sparsity_lib.kept_count(params, self.is_trainable, self.sparsity)

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return AdapterHooks(self, dtype)

    def is_trainable(self, path: ParamPath) -> bool:
        return is_peft_path(path) or (self.train_layer_norms and is_layer_norm_path(path))

    def validate(self, t5: T5Config) -> None:
        b = self.bottleneck(t5.d_model)
        if b < 1:
            raise ValueError(f"{self.name}: reduction_factor={self.reduction_factor} leaves no "
                             f"bottleneck for d_model={t5.d_model}; lower reduction_factor")
        if self.projection in ("phm", "lphm"):
            rank = self.rank if self.projection == "lphm" else None
            try:
                phm.check_phm_dims(t5.d_model, b, self.n, rank)
            except ValueError as e:
                raise ValueError(f"{self.name}: adapter d_model={t5.d_model} -> bottleneck {b} "
                                 f"(reduction_factor={self.reduction_factor}): {e}") from None
        if self.projection == "lowrank" and self.rank > b:
            raise ValueError(f"{self.name}: rank={self.rank} exceeds the bottleneck {b}; "
                             "lower `rank`")
        num_layers = min(t5.num_layers, t5.num_decoder_layers)
        if self.drop_first >= num_layers:
            raise ValueError(f"{self.name}: drop_first={self.drop_first} removes every adapter of "
                             f"a {num_layers}-block stack; lower drop_first")
        if self.blocks is not None and any(i >= num_layers for i in self.blocks):
            raise ValueError(f"{self.name}: blocks={self.blocks} has indices beyond the "
                             f"{num_layers} blocks of the model")


@dataclasses.dataclass(frozen=True)
class AdapterHooks(T5Hooks):
    """The T5 insertion points of an `AdapterMethod` (adapters + the shared rule)."""

    method: AdapterMethod
    dtype: str | None = None

    def root_module(self, name: str = "peft_root") -> nn.Module | None:
        if not self.method.shared_rule:
            return None
        return layers.PeftRoot(n=self.method.n,
                               rule_std=self.method.rule_init_std or layers.SHARED_RULE_STD,
                               name=name)

    def sublayer_adapter(self, site: Site, d_model: int, name: str = "adapter") -> nn.Module | None:
        m = self.method
        if site.sublayer not in m.positions or site.stack not in m.stacks:
            return None
        # Scanned layers (site.layer None) only reach here when uniform_over_layers() holds.
        if site.layer is not None and not m.block_has_adapter(site.layer):
            return None
        return layers.Adapter(
            reduction_factor=m.reduction_factor, projection=m.projection, n=m.n, rank=m.rank,
            use_shared_rule=m.shared_rule, own_rule_std=m.rule_init_std or layers.OWN_RULE_STD,
            phm_path=m.phm_path, dtype=self.dtype, name=name)

    def uniform_over_layers(self) -> bool:
        return not self.method.layer_dependent
