"""Intrinsic-SAID (Aghajanyan et al. 2020, "Intrinsic Dimensionality Explains the Effectiveness
of Language Model Fine-Tuning"), as the original Compacter code runs it (paper Table 1: d' = 20,000,
structure-aware, Fastfood projection, lr 3e-2).

Intrinsic-SAID trains a vector of d numbers instead of the backbone. Every projected backbone
tensor i (D_i entries) is

    theta_i = theta0_i + said[i] * P_i(vector)                    (said=False: no said[i])
    P_i(v)  = (H G Pi H B pad(v))[:D_i] / (divisor_i * sqrt(D_i / L_i))
    divisor_i = sqrt(L_i * sum(G^2)),   L_i = 2 ** ceil(log2(D_i))

H is the unnormalised L x L Walsh-Hadamard matrix (Sylvester order), B a +-1 diagonal, Pi a
uniform permutation applied as a gather ((Pi x)[j] = x[Pi[j]]) and G a N(0, 1) diagonal,
drawn once per tensor and frozen. This is the formula of the original code
(`seq2seq/projections/intrinsic.py`; the projection is `compacter_jax.peft.fastfood`).

What the original does and this module reproduces:

* Sizes. With SAID it counts the model's parameter tensors n (`said_size`; T5-base: 257,
  the tied lm_head is the embedding's tensor), trains a vector of d - n - 1 entries and a
  said vector of n + 1 ones: `said[i]` scales tensor i in HF `named_parameters` order and
  the last entry belongs to the vector itself in the original's loop and is never used (zero
  gradient). Trainable total: exactly d (T5-base, d = 20,000: 19,742 + 258).
* A vector longer than L_i is cut to its first L_i entries (the original's `F.pad` with a
  negative pad); a shorter one is zero-padded.
* P_i(v) is reshaped in torch layout: kernels ([in, out] here, `weight` [out, in] in torch)
  take the flat projection as [out, in] and are transposed.
* Each layer slice of a scanned leaf (`{stack}/blocks/...`, layer axis 0) is its own tensor
  with its own constants and said entry: same count, constants and values as unscanned.

Not reproduced here (the model's business): in the original's tied T5 (v1.0) the lm_head
stays at theta0. Its hook replaces `shared.weight` on the embedding module (which the encoder
and decoder use), while `lm_head.weight` still references the original, now frozen, Parameter.
Our tied T5 reads `shared/embedding` for both. The Fastfood draws (torch / numpy RNGs in the
original) cannot be bit-identical; their distributions are.

The method inserts no module: `partition` makes the trainable tree {"vector", "said"} and the
frozen {"theta0": backbone, "constants": Fastfood constants drawn from `seed`};
`combine` computes the backbone the model is applied with. An export holds the trainable
tree and the method's fields (seed included), so loading redraws the same constants.
Memory on T5-base: 3.5 GB of constants (386M padded entries, 9 bytes each); a train step
fits in about 12 GB (benchmarks/fastfood.py).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.struct
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models import is_backbone_path
from compacter_jax.models.hf_io import flax_path_to_hf
from compacter_jax.peft.fastfood import (FastfoodConstants, draw_constants, fastfood_length,
                                         fastfood_project)
from compacter_jax.peft.method import Method, ParamPath

Array = jax.Array
Path = tuple[str, ...]
# Rows of a constants group projected at once (rows * L <= this) to bound temporaries.
MAX_CHUNK_ELEMENTS = 2**25


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class ProjectedTensor:
    """One projected tensor (a layer slice of a scanned leaf is one tensor).

    Attributes:
      name: its unscanned path, e.g. "encoder/block_3/layer_0/SelfAttention/q/kernel".
      hf_name: its HF parameter name, None for paths without one.
      shape: its shape in the Flax tree (no layer axis).
      transpose: the projection is shaped [out, in] (torch layout) and transposed.
      group, row: where its constants are in IntrinsicConstants.groups.
    """
    name: str
    hf_name: str | None
    shape: tuple[int, ...]
    transpose: bool
    group: int
    row: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ProjectedLeaf:
    """A leaf of the parameter tree: its tensors (one per layer when scanned), rows in order."""
    path: Path
    num_layers: int | None  # None: unscanned leaf
    tensors: tuple[int, ...]  # indices into IntrinsicLayout.tensors (= said indices)
    group: int
    row_start: int


@dataclasses.dataclass(frozen=True)
class IntrinsicLayout:
    """The projected tensors in the original's order and the trainable sizes.

    Attributes:
      intrinsic_dim: d, the requested trainable total.
      said: one trained scale per tensor (structure-aware).
      tensors: tensors[i] is scaled by said[i] (HF `named_parameters` order, then other paths).
      leaves: the tree leaves they come from.
      groups: (L, D) of each constants group.
    """
    intrinsic_dim: int
    said: bool
    tensors: tuple[ProjectedTensor, ...]
    leaves: tuple[ProjectedLeaf, ...]
    groups: tuple[tuple[int, int], ...]

    @property
    def said_size(self) -> int:
        """n + 1 with SAID (the original's extra, unused entry), else 0."""
        return len(self.tensors) + 1 if self.said else 0

    @property
    def vector_size(self) -> int:
        return self.intrinsic_dim - self.said_size

    @property
    def trainable_count(self) -> int:
        return self.vector_size + self.said_size


_HF_RANK = {"shared": 0, "encoder": 1, "decoder": 2, "lm_head": 3, "block": 0,
            "final_layer_norm": 1, "layer": 0, "SelfAttention": 0, "EncDecAttention": 0,
            "DenseReluDense": 0, "layer_norm": 1, "q": 0, "k": 1, "v": 2, "o": 3,
            "relative_attention_bias": 4, "wi": 0, "wi_0": 1, "wi_1": 2, "wo": 3, "weight": 0}


def _order_key(name: str, hf_name: str | None) -> tuple:
    """HF module-registration order (torch named_parameters) for HF names, then the rest."""
    if hf_name is None:
        return (1, name)
    tokens = tuple((0, int(t)) if t.isdigit() else (1, _HF_RANK.get(t, len(_HF_RANK)))
                   for t in hf_name.split("."))
    return (0, tokens, hf_name)


def _as_path(path: str | Path) -> Path:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


def param_shapes(tree: Any) -> dict[Path, tuple[int, ...]]:
    """Flat {path: shape} of a nested tree of arrays or jax.ShapeDtypeStruct."""
    return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(tree).items()}


def intrinsic_layout(shapes: Mapping[str | Path, tuple[int, ...]], intrinsic_dim: int,
                     said: bool = True) -> IntrinsicLayout:
    """The layout of Intrinsic-SAID over the given backbone tensors.

    Args:
      shapes: flat {path ("a/b/c" or tuple): shape} of the tensors to project; scanned leaves
        `{encoder|decoder}/blocks/...` have a leading layer axis.
      intrinsic_dim: d, the trainable total (vector + said), as the original's intrinsic_dim.
      said: train one scale per tensor.
    Returns:
      IntrinsicLayout.
    """
    if not shapes:
        raise ValueError("intrinsic_layout: `shapes` is empty; pass the backbone's "
                         "{path: shape} (param_shapes(params))")
    pieces = []  # (order key, name, hf_name, shape, transpose, leaf path, layer)
    for raw_path, raw_shape in shapes.items():
        path, shape = _as_path(raw_path), tuple(int(s) for s in raw_shape)
        scanned = len(path) > 2 and path[0] in ("encoder", "decoder") and path[1] == "blocks"
        if scanned and not shape:
            raise ValueError(f"scanned leaf {'/'.join(path)} has no layer axis (shape ())")
        layers = range(shape[0]) if scanned else [None]
        for layer in layers:
            unscanned = (path[0], f"block_{layer}") + path[2:] if scanned else path
            tensor_shape = shape[1:] if scanned else shape
            if math.prod(tensor_shape) == 0:
                raise ValueError(f"tensor {'/'.join(unscanned)} has no entries {tensor_shape}")
            hf = flax_path_to_hf(unscanned)
            hf_name, transpose = hf if hf else (None, False)
            if transpose and len(tensor_shape) != 2:
                raise ValueError(f"kernel {'/'.join(unscanned)} must be 2-D, got {tensor_shape}")
            name = "/".join(unscanned)
            pieces.append((_order_key(name, hf_name), name, hf_name, tensor_shape, transpose,
                           path, layer))
    pieces.sort(key=lambda p: p[0])
    if said and intrinsic_dim < len(pieces) + 2:
        raise ValueError(
            f"intrinsic_dim={intrinsic_dim} leaves no intrinsic vector with SAID over "
            f"{len(pieces)} tensors (the vector gets intrinsic_dim - {len(pieces) + 1}); use "
            f"intrinsic_dim >= {len(pieces) + 2} (the paper: 20000)")
    if intrinsic_dim < 1:
        raise ValueError(f"intrinsic_dim must be >= 1, got {intrinsic_dim}")

    # Leaves in the order of their first tensor; a leaf's rows are contiguous in its group.
    leaf_tensors: dict[Path, list[int]] = {}
    for i, piece in enumerate(pieces):
        leaf_tensors.setdefault(piece[5], []).append(i)
    group_ids: dict[tuple[int, int], int] = {}
    group_rows: list[int] = []
    rows: dict[int, tuple[int, int]] = {}
    leaves = []
    for path, idx in leaf_tensors.items():
        size = math.prod(pieces[idx[0]][3])
        gkey = (fastfood_length(size), size)
        if gkey not in group_ids:
            group_ids[gkey] = len(group_ids)
            group_rows.append(0)
        g = group_ids[gkey]
        start = group_rows[g]
        idx = sorted(idx, key=lambda i: pieces[i][6] or 0)  # layer order
        for r, i in enumerate(idx):
            rows[i] = (g, start + r)
        group_rows[g] += len(idx)
        num_layers = len(idx) if pieces[idx[0]][6] is not None else None
        leaves.append(ProjectedLeaf(path, num_layers, tuple(idx), g, start))
    tensors = tuple(ProjectedTensor(p[1], p[2], p[3], p[4], *rows[i]) for i, p in enumerate(pieces))
    return IntrinsicLayout(intrinsic_dim, said, tensors, tuple(leaves), tuple(group_ids))


# ----------------------------------------------------------------------------- Intrinsic-SAID


@flax.struct.dataclass
class IntrinsicConstants:
    """Frozen state of Intrinsic-SAID: the layout (static) and one stacked
    FastfoodConstants per (L, D) group ([rows, L] arrays)."""
    groups: tuple[FastfoodConstants, ...]
    layout: IntrinsicLayout = flax.struct.field(pytree_node=False)


def make_intrinsic_constants(key: Array, layout: IntrinsicLayout) -> IntrinsicConstants:
    """Draws every tensor's constants with key fold_in(key, crc32(name)): a tensor's constants
    depend only on (key, its unscanned name, its size), not on the other tensors or scanning."""
    groups = []
    for g, (length, size) in enumerate(layout.groups):
        members = sorted((t for t in layout.tensors if t.group == g), key=lambda t: t.row)
        # Filled in place, one group at a time: host memory stays ~ the largest group.
        arrays = {"signs": np.empty((len(members), length), np.int8),
                  "permutation": np.empty((len(members), length), np.int32),
                  "gaussian": np.empty((len(members), length), np.float32),
                  "divisor": np.empty((len(members),), np.float32)}
        for t in members:
            salt = zlib.crc32(t.name.encode()) & 0x7FFFFFFF
            for name, value in draw_constants(key, size, salt).items():
                arrays[name][t.row] = value
        groups.append(FastfoodConstants(**{k: jnp.asarray(v) for k, v in arrays.items()},
                                        out_size=size))
        del arrays
    return IntrinsicConstants(tuple(groups), layout)


def init_intrinsic(key: Array, shapes: Mapping[str | Path, tuple[int, ...]],
                   intrinsic_dim: int, said: bool = True) -> tuple[dict, IntrinsicConstants]:
    """Trainable state and frozen constants of Intrinsic-SAID over `shapes`.

    Args:
      key: a jax.random key for the Fastfood constants.
      shapes: flat {path: shape} of the backbone tensors to project (see intrinsic_layout).
      intrinsic_dim: d, the trainable total (the paper: 20000).
      said: train one scale per tensor (else only the vector).
    Returns:
      (trainable, constants): trainable = {"vector": zeros float32 [d - n - 1],
      "said": ones float32 [n + 1]} with SAID, {"vector": zeros [d]} without.
    """
    layout = intrinsic_layout(shapes, intrinsic_dim, said)
    trainable = {"vector": jnp.zeros((layout.vector_size,), jnp.float32)}
    if said:
        trainable["said"] = jnp.ones((layout.said_size,), jnp.float32)
    return trainable, make_intrinsic_constants(key, layout)


def _project_group(vector: Array, constants: FastfoodConstants, original_gradient_scale: bool,
                   max_chunk_elements: int) -> Array:
    def one(c):
        return fastfood_project(vector, c, original_gradient_scale=original_gradient_scale)

    rows = constants.signs.shape[0]
    chunk = max(1, max_chunk_elements // constants.length)
    if rows <= chunk:
        return one(constants)
    return jax.lax.map(one, constants, batch_size=chunk)


def intrinsic_params(trainable: Mapping[str, Array], theta0: Any, constants: IntrinsicConstants,
                     *, original_gradient_scale: bool = False,
                     max_chunk_elements: int = MAX_CHUNK_ELEMENTS) -> dict:
    """The full parameter tree theta0 + said[i] * P_i(vector) (said[i] = 1 without SAID).

    Args:
      trainable: {"vector": [vector_size], "said": [said_size] (SAID only)}.
      theta0: the frozen backbone tree (nested dict); leaves outside the layout pass through.
      constants: from init_intrinsic / make_intrinsic_constants.
      original_gradient_scale: the original's 1/L_i scaling of the vector's gradient.
      max_chunk_elements: rows of a group projected together (rows * L <= this), bounding
        temporary memory; results do not depend on it.
    Returns:
      a tree with theta0's structure and dtypes (projection added in float32, then cast).
    """
    layout = constants.layout
    vector = trainable.get("vector")
    if vector is None or tuple(vector.shape) != (layout.vector_size,):
        raise ValueError(f"trainable['vector'] must have shape ({layout.vector_size},), got "
                         f"{None if vector is None else tuple(vector.shape)}")
    said = trainable.get("said")
    if layout.said and (said is None or tuple(said.shape) != (layout.said_size,)):
        raise ValueError(f"trainable['said'] must have shape ({layout.said_size},) with SAID, "
                         f"got {None if said is None else tuple(said.shape)}")
    flat = dict(traverse_util.flatten_dict(theta0))
    for leaf in layout.leaves:
        spec = layout.tensors[leaf.tensors[0]]
        expected = ((len(leaf.tensors),) if leaf.num_layers else ()) + spec.shape
        if leaf.path not in flat:
            raise ValueError(f"theta0 has no parameter {'/'.join(leaf.path)} (in the layout)")
        if tuple(flat[leaf.path].shape) != expected:
            raise ValueError(f"theta0 {'/'.join(leaf.path)} has shape "
                             f"{tuple(flat[leaf.path].shape)}, the layout expects {expected}")
    rays: dict[Path, Array] = {}
    for g, group_constants in enumerate(constants.groups):
        group_rays = _project_group(vector, group_constants, original_gradient_scale,
                                    max_chunk_elements)
        # A group's leaves hold consecutive rows. One split (its VJP is one concatenate), not
        # a slice per leaf: each slice's VJP pads to the whole group, [rows, D] per leaf.
        members = sorted((leaf for leaf in layout.leaves if leaf.group == g),
                         key=lambda leaf: leaf.row_start)
        bounds = np.cumsum([len(leaf.tensors) for leaf in members])[:-1]
        rays.update((leaf.path, part) for leaf, part in
                    zip(members, jnp.split(group_rays, bounds, axis=0)))
    for leaf in layout.leaves:
        base, spec, n = flat[leaf.path], layout.tensors[leaf.tensors[0]], len(leaf.tensors)
        ray = rays[leaf.path]
        if spec.transpose:
            ray = jnp.swapaxes(ray.reshape((n,) + spec.shape[::-1]), -1, -2)
        else:
            ray = ray.reshape((n,) + spec.shape)
        if layout.said:
            ray = ray * said[np.asarray(leaf.tensors)].reshape((n,) + (1,) * len(spec.shape))
        if not leaf.num_layers:
            ray = ray[0]
        flat[leaf.path] = (base.astype(jnp.float32) + ray).astype(base.dtype)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- the method


_intrinsic_params_jit = jax.jit(intrinsic_params,
                                static_argnames=("original_gradient_scale",
                                                 "max_chunk_elements"))


@dataclasses.dataclass(frozen=True)
class IntrinsicSAID(Method):
    """Intrinsic-SAID over every backbone tensor.

    Attributes:
      dim: d', the trainable total (vector + one scale per tensor with `said`): 20,000 in
        the paper.
      said: structure-aware (one trained scale per tensor).
      seed: the key of the Fastfood constants (recorded, so a reload redraws them).
      original_gradient_scale: the original's 1/L scaling of the vector's gradient
        (`compacter_jax.peft.fastfood`); off: the true gradient.
    """

    dim: int = 20_000
    said: bool = True
    seed: int = 0
    original_gradient_scale: bool = False

    task_prefix: ClassVar[bool] = True
    bankable: ClassVar[bool] = False  # the vector moves every backbone tensor: no per-task split

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim < 1:
            raise ValueError(f"{self.name}: dim must be >= 1, got {self.dim}")
        if self.seed < 0:
            raise ValueError(f"{self.name}: seed must be >= 0, got {self.seed}")

    def is_trainable(self, path: ParamPath) -> bool:
        return False  # nothing of the model's own tree: the vector lives beside it

    def _shapes(self, params: Any) -> dict[Path, tuple[int, ...]]:
        return {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(params).items()
                if is_backbone_path(p)}

    def trainable_count(self, params: Any) -> int:
        self.check_params(params)
        return intrinsic_layout(self._shapes(params), self.dim, self.said).trainable_count

    def partition(self, params: Mapping[str, Any]) -> tuple[dict, dict]:
        self.check_params(params)
        trainable, constants = init_intrinsic(jax.random.PRNGKey(self.seed),
                                              self._shapes(params), self.dim, self.said)
        return trainable, {"theta0": dict(params), "constants": constants}

    def combine(self, trainable: Any, frozen: Any) -> dict:
        return _intrinsic_params_jit(trainable, frozen["theta0"], frozen["constants"],
                                     original_gradient_scale=self.original_gradient_scale)
