"""DSEE (Chen et al. 2021, "Dually Sparsity-embedded Efficient Tuning", arXiv 2111.00160),
its parameter-efficient half: each targeted projection W gets the update

    delta W = (alpha / rank) * (A B + S),    A [in, rank], B [rank, out] (zeros),
                                             S [in, out] non-zero at `num_sparse` fixed places

S's places come from the pretrained weight, as the authors' code does: a GoDec-style split
W ~ L + S0 (L of rank `rank_fraction` x min(in, out) from a truncated SVD of W - S0, S0 = W - L
with entries below `threshold` zeroed, `iterations` times; their GreBsmo grows L's rank to
501 on BERT-base's 768 x 768 projections: 0.65), and the `num_sparse` largest |S0| are S's
support. S's
values start at zero (the authors' start from nn.Linear's init on those entries; zero keeps
the model at the pretrained function at init, as LoRA), so only A, B and S's values train.
Defaults are the authors' GLUE scripts': rank 16, alpha 32, 16 sparse entries, on q and v
(of every self- and cross-attention of T5).

The places are frozen int32 parameters (`sparse_index`, flat into in*out), computed by
`prepare` from the loaded backbone, so `load_adapter` recomputes them from the same weights.
DSEE's second half, sparse final weights for inference, as a function: `merge_and_prune`
folds each update into its projection (W + delta W, the delta then zero) and zeroes the
smallest-magnitude `sparsity` fraction of each merged projection (unstructured, per matrix;
the authors then tune again, not done here).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.dtypes import promote_dtype

from compacter_jax.models import Site, T5Config, T5Hooks
from compacter_jax.peft import layers
from compacter_jax.peft.method import Method, ParamPath, as_tuple, is_peft_path

TARGETS = ("q", "k", "v", "o")
INDEX = "sparse_index"


def sparse_support(w: np.ndarray, num_sparse: int, residual_rank: int,
                   iterations: int = 2, threshold: float = 0.01) -> np.ndarray:
    """Flat indices (into w.size, int32 [num_sparse], ascending) of the largest entries of
    the sparse part of `w` [in, out] after a GoDec split (module docstring). The rank is
    capped at min(in, out) - 1 so that a residual remains. Deterministic (SVD, stable sort)."""
    w = np.asarray(w, np.float64)
    k = max(1, min(residual_rank, min(w.shape) - 1))
    s = np.zeros_like(w)
    for _ in range(iterations):
        u, sv, vt = np.linalg.svd(w - s, full_matrices=False)
        low = (u[:, :k] * sv[:k]) @ vt[:k]
        s = w - low
        s[np.abs(s) < threshold] = 0.0
    order = np.argsort(-np.abs(s).ravel(), kind="stable")
    return np.sort(order[:num_sparse]).astype(np.int32)


class SparseLowRankDelta(nn.Module):
    """(alpha / rank) * x @ (A B + S), S = `sparse_values` [N] scattered to the flat places
    `sparse_index` [N] of an [in, out] matrix. x: [..., in] -> [..., features_out]."""

    features_out: int
    rank: int = 16
    alpha: float = 32.0
    num_sparse: int = 16
    dtype: Any = None

    @nn.compact
    def __call__(self, x, shared: Any = None):
        d_in = x.shape[-1]
        a = self.param("lora_a", layers.lora_a_init, (d_in, self.rank))
        b = self.param("lora_b", nn.initializers.zeros_init(), (self.rank, self.features_out))
        values = self.param("sparse_values", nn.initializers.zeros_init(), (self.num_sparse,))
        index = self.param(INDEX, lambda key, shape: jnp.arange(shape[0], dtype=jnp.int32),
                           (self.num_sparse,))
        s = jnp.zeros(d_in * self.features_out, values.dtype).at[index].add(values)
        x, a, b, s = promote_dtype(x, a, b, s.reshape(d_in, self.features_out),
                                          dtype=self.dtype)
        return ((x @ a) @ b + x @ s) * jnp.asarray(self.alpha / self.rank, x.dtype)


@dataclasses.dataclass(frozen=True)
class DSEEMethod(Method):
    """Attributes:
      rank, alpha: the low-rank part (scale alpha / rank on both parts, as the authors').
      num_sparse: non-zeros of S per projection. targets: attention projections updated.
      rank_fraction, iterations, threshold: the GoDec split that places S (module doc).
    """

    rank: int = 16
    alpha: float = 32.0
    num_sparse: int = 16
    targets: tuple[str, ...] = ("q", "v")
    rank_fraction: float = 0.65
    iterations: int = 2
    threshold: float = 0.01

    task_prefix: ClassVar[bool] = False  # per-task modules, like LoRA
    # The places are frozen int leaves derived from the backbone; banks (which stack the
    # trainable trees of K tasks) are not yet checked with them.
    bankable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "targets", as_tuple(self.targets))
        for f in ("rank", "num_sparse", "iterations"):
            if getattr(self, f) < 1:
                raise ValueError(f"{self.name}: {f} must be >= 1, got {getattr(self, f)}")
        if not 0.0 < self.rank_fraction < 1.0:
            raise ValueError(f"{self.name}: rank_fraction must be in (0, 1), got "
                             f"{self.rank_fraction}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"{self.name}: targets has unknown {bad}; use a non-empty subset "
                             f"of {TARGETS} (DSEE updates attention projections)")

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return DSEEHooks(self, dtype)

    def is_trainable(self, path: ParamPath) -> bool:
        return is_peft_path(path) and path[-1] != INDEX  # the places are fixed

    def validate(self, t5: T5Config) -> None:
        if self.num_sparse > t5.d_model * t5.num_heads * t5.d_kv:
            raise ValueError(f"{self.name}: num_sparse={self.num_sparse} exceeds the entries "
                             "of an attention projection; lower num_sparse")

    def prepare(self, params: dict, t5: T5Config) -> dict:
        """Places each S at the largest entries of its pretrained weight's sparse part."""
        flat = traverse_util.flatten_dict(dict(params))
        for path in [p for p in flat if p[-1] == INDEX]:
            projection = path[-2].removesuffix("_delta")
            kernel = np.asarray(flat[path[:-2] + (projection, "kernel")])
            support = lambda w: sparse_support(  # noqa: E731
                w, self.num_sparse, round(self.rank_fraction * min(w.shape)), self.iterations,
                self.threshold)
            index = (np.stack([support(w) for w in kernel]) if kernel.ndim == 3  # scanned
                     else support(kernel))
            flat[path] = jnp.asarray(index, jnp.int32)
        return traverse_util.unflatten_dict(flat)


def merged_delta(delta: dict, d_in: int, d_out: int, scale: float) -> np.ndarray:
    """delta W [in, out] (float64) of one `SparseLowRankDelta`'s params."""
    s = np.zeros(d_in * d_out)
    np.add.at(s, np.asarray(delta[INDEX]), np.asarray(delta["sparse_values"], np.float64))
    return scale * (np.asarray(delta["lora_a"], np.float64) @ np.asarray(delta["lora_b"],
                                                                         np.float64)
                    + s.reshape(d_in, d_out))


def merge_and_prune(params: dict, method: DSEEMethod, sparsity: float = 0.0) -> dict:
    """Params (unscanned) with every DSEE update folded into its projection and the smallest
    `sparsity` fraction (floor) of each merged projection's entries set to zero; the deltas
    are zeroed, so the same model computes x @ pruned(W + delta W).

    Args:
      params: full params of a DSEE model (`method.combine(trainable, frozen)`).
      sparsity: in [0, 1); 0 merges only.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    flat = dict(traverse_util.flatten_dict(dict(params)))
    for path in [p for p in flat if p[-1] == INDEX]:
        owner, projection = path[:-2], path[-2].removesuffix("_delta")
        kernel = np.asarray(flat[owner + (projection, "kernel")], np.float64)
        if kernel.ndim != 2:
            raise ValueError("merge_and_prune needs unscanned params (models.unstack_blocks)")
        delta = {k[-1]: v for k, v in flat.items() if k[:-1] == path[:-1]}
        merged = kernel + merged_delta(delta, *kernel.shape, method.alpha / method.rank)
        cut = int(np.floor(sparsity * merged.size + 1e-9))
        if cut:
            order = np.argsort(np.abs(merged).ravel(), kind="stable")
            merged.ravel()[order[:cut]] = 0.0
        dtype = flat[owner + (projection, "kernel")].dtype
        flat[owner + (projection, "kernel")] = jnp.asarray(merged, dtype)
        for k in delta:
            if k != INDEX:
                flat[path[:-1] + (k,)] = jnp.zeros_like(flat[path[:-1] + (k,)])
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class DSEEHooks(T5Hooks):
    method: DSEEMethod
    dtype: str | None = None

    def projection_delta(self, site: Site, projection: str, in_features: int,
                         out_features: int, name: str) -> nn.Module | None:
        m = self.method
        if projection not in m.targets:
            return None
        return SparseLowRankDelta(out_features, rank=m.rank, alpha=m.alpha,
                                  num_sparse=m.num_sparse, dtype=self.dtype, name=name)
