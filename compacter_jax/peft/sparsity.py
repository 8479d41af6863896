"""SparseAdapter (He et al. 2022, arXiv 2210.04284): PEFT weights pruned once, at initialisation.

Before training, every prunable weight of the method (adapter down/up kernels, low-rank and
PHM/Compacter factors, LoRA A and B; never biases, PHM rules or layer norms) gets a score,
and the `sparsity` fraction with the lowest scores over all of them (one global ranking, as
SNIP) is set to zero. The 0/1 masks travel in the optimizer state (`keep_pruned`, so they are
checkpointed with it); the transform multiplies the *final* update by the mask, after
clipping, Adam and decoupled weight decay, so a pruned weight stays exactly 0.0 whatever the
optimizer (AdamW with weight decay included).

Criteria (`prune`), scores of weight w with gradient g of the training loss on a few
training batches (higher = kept):
  random     uniform noise (the paper's baseline; fine up to 80% sparsity on GLUE).
  magnitude  |w|.
  snip       |w * g|           (Lee et al. 2019, the paper's recommended criterion).
  grasp      w * (H g)         (Wang et al. 2020: GraSP removes the largest -w * Hg).
  erdos_renyi  random within each tensor, tensor [.., i, o] keeping a share proportional to
             (i + o) / (i * o) (Mocanu et al. 2018), capped at all of it; the only criterion
             that sets per-tensor budgets instead of one global ranking.
Ties (e.g. LoRA's B = 0 at init, where |w * g| is 0 everywhere) are broken by the same
seeded noise as `random`, so the ranking is total and deterministic.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from compacter_jax.host import param_count
from compacter_jax.models import unstack_blocks
from compacter_jax.peft.method import ParamPath, is_peft_path

CRITERIA = ("random", "magnitude", "snip", "grasp", "erdos_renyi")
PRUNABLE = ("kernel", "lowrank_left", "lowrank_right", "phm_factors", "phm_left", "phm_right",
            "lora_a", "lora_b")


def is_prunable(path: ParamPath) -> bool:
    """True for a weight matrix (or PHM factor) a PEFT method inserted."""
    return bool(path) and path[-1] in PRUNABLE and is_peft_path(path)


def check(sparsity: float, prune: str, owner: str) -> None:
    """Raises ValueError naming the field when (sparsity, prune) is not a valid setting."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{owner}: sparsity={sparsity} must be in [0, 1) (the fraction of "
                         "adapter weights pruned at initialisation)")
    if prune not in CRITERIA:
        raise ValueError(f"{owner}: prune={prune!r}; use one of {CRITERIA}")


def _flat(tree: Any) -> dict[ParamPath, Any]:
    return traverse_util.flatten_dict(dict(tree))


def num_pruned(num_prunable: int, sparsity: float) -> int:
    """Weights set to zero among `num_prunable`: floor(sparsity * num_prunable)."""
    return int(np.floor(sparsity * num_prunable + 1e-9))


def kept_count(params: Any, is_trainable: Callable[[ParamPath], bool], sparsity: float) -> int:
    """Trainable non-zeros after pruning (the count a SparseAdapter reports); works on
    ShapeDtypeStructs."""
    sizes = {p: param_count(v) for p, v in _flat(params).items() if is_trainable(p)}
    prunable = sum(n for p, n in sizes.items() if is_prunable(p))
    return sum(sizes.values()) - num_pruned(prunable, sparsity)


def scores(criterion: str, params: Any, *, key: jax.Array,
           loss_fn: Callable[[Any, Any], jax.Array] | None = None,
           batches: Iterable[Any] = ()) -> dict:
    """Per-weight scores of the prunable leaves of `params` (a flat dict path -> float32
    array; higher = more worth keeping).

    Args:
      criterion: one of CRITERIA.
      params: the trainable tree at initialisation.
      key: PRNG key of the `random` criterion (and of the tie-break in `masks_from_scores`).
      loss_fn: (params, batch) -> scalar training loss; needed by snip and grasp. The
        gradient is the mean over `batches`.
    """
    flat = {p: v for p, v in _flat(params).items() if is_prunable(p)}
    if criterion in ("random", "erdos_renyi"):  # erdos_renyi: per tensor, `prune_at_init`
        keys = jax.random.split(key, len(flat))
        return {p: jax.random.uniform(k, v.shape) for k, (p, v) in zip(keys, flat.items())}
    if criterion == "magnitude":
        return {p: jnp.abs(v).astype(jnp.float32) for p, v in flat.items()}
    if criterion not in ("snip", "grasp"):
        raise ValueError(f"unknown pruning criterion {criterion!r}; use one of {CRITERIA}")
    batches = list(batches)
    if loss_fn is None or not batches:
        raise ValueError(f"prune={criterion!r} needs the training loss and at least one "
                         "training batch")
    grad_fn = jax.jit(jax.grad(loss_fn))
    grads = jax.tree_util.tree_map(lambda *g: sum(g) / len(g),
                                   *[grad_fn(params, b) for b in batches])
    g = _flat(grads)
    if criterion == "snip":
        return {p: jnp.abs(v * g[p]).astype(jnp.float32) for p, v in flat.items()}
    # GraSP: Hessian-gradient product H g by forward-over-reverse, averaged over batches.
    hvp = jax.jit(lambda b: jax.jvp(lambda q: jax.grad(loss_fn)(q, b), (params,), (grads,))[1])
    hg = _flat(jax.tree_util.tree_map(lambda *h: sum(h) / len(h), *[hvp(b) for b in batches]))
    return {p: (v * hg[p]).astype(jnp.float32) for p, v in flat.items()}


def erdos_renyi_keep(sizes: dict, num_keep: int) -> dict:
    """Kept weights per tensor (path -> int, summing to `num_keep`): density eps (i + o) /
    (i o) of each [..., i, o] tensor, eps set so the total is num_keep, capped at 1 (the
    capped tensors keep all, the rest share what remains); largest remainders round."""
    shapes = {p: tuple(s) for p, s in sizes.items()}
    size = {p: int(np.prod(s)) for p, s in shapes.items()}
    raw = {p: (s[-2] + s[-1]) / (s[-2] * s[-1]) if len(s) >= 2 else 1.0
           for p, s in shapes.items()}
    full: set = set()
    while True:
        free = [p for p in shapes if p not in full]
        budget = num_keep - sum(size[p] for p in full)
        eps = budget / max(sum(raw[p] * size[p] for p in free), 1e-30)
        over = {p for p in free if eps * raw[p] > 1.0}
        if not over:
            break
        full |= over
    want = {p: size[p] if p in full else eps * raw[p] * size[p] for p in shapes}
    keep = {p: int(np.floor(v)) for p, v in want.items()}
    rest = num_keep - sum(keep.values())
    for p in sorted(shapes, key=lambda p: (-(want[p] - keep[p]), p))[:rest]:
        keep[p] += 1
    return keep


def masks_from_scores(score: dict, sparsity: float, key: jax.Array) -> dict:
    """0/1 float32 masks (flat dict like `score`): the `num_pruned` lowest scores over all
    leaves together are 0. Ties broken by seeded noise (module docstring)."""
    paths = sorted(score)
    values = np.concatenate([np.asarray(score[p], np.float64).ravel() for p in paths])
    keys = jax.random.split(key, len(paths))
    noise = np.concatenate([np.asarray(jax.random.uniform(k, np.shape(score[p]))).ravel()
                            for k, p in zip(keys, paths)])
    order = np.lexsort((noise, values))  # ascending: the first num_pruned go
    keep = np.ones(len(values), np.float32)
    keep[order[:num_pruned(len(values), sparsity)]] = 0.0
    out, start = {}, 0
    for p in paths:
        n = int(np.prod(np.shape(score[p])))
        out[p] = jnp.asarray(keep[start:start + n].reshape(np.shape(score[p])))
        start += n
    return out


def mask_tree(params: Any, flat_masks: dict) -> Any:
    """A tree like `params`: the mask on prunable leaves, a scalar 1.0 elsewhere."""
    flat = _flat(params)
    missing = [p for p in flat if is_prunable(p) and p not in flat_masks]
    if missing:
        raise ValueError(f"no sparsity mask for {'/'.join(missing[0])}: masks were computed "
                         "for another parameter tree")
    return traverse_util.unflatten_dict(
        {p: flat_masks[p] if is_prunable(p) else jnp.ones((), jnp.float32) for p in flat})


def apply_masks(params: Any, masks: Any) -> Any:
    """params * mask, leaf by leaf (x * 1.0 and x * 0.0 are exact)."""
    return jax.tree_util.tree_map(lambda p, m: p * m.astype(p.dtype), params, masks)


def prune_at_init(params: Any, sparsity: float, criterion: str, *, key: jax.Array,
                  loss_fn: Callable[[Any, Any], jax.Array] | None = None,
                  batches: Iterable[Any] = ()) -> tuple[Any, Any]:
    """(pruned params, mask tree) for the trainable tree `params` (see `scores`)."""
    score_key, tie_key = jax.random.split(key)
    if criterion == "erdos_renyi":  # per-tensor budgets, random within each
        noise = scores("random", params, key=score_key)
        total = sum(int(np.size(v)) for v in noise.values())
        keep = erdos_renyi_keep({p: np.shape(v) for p, v in noise.items()},
                                total - num_pruned(total, sparsity))
        flat_masks = {}
        for p, v in noise.items():
            kept = np.zeros(np.size(v), np.float32)
            kept[np.argsort(-np.asarray(v).ravel(), kind="stable")[:keep[p]]] = 1.0
            flat_masks[p] = jnp.asarray(kept.reshape(np.shape(v)))
        masks = mask_tree(params, flat_masks)
        return apply_masks(params, masks), masks
    score = scores(criterion, params, key=score_key, loss_fn=loss_fn, batches=batches)
    masks = mask_tree(params, masks_from_scores(score, sparsity, tie_key))
    return apply_masks(params, masks), masks


def trained_count(params: Any, masks: Any) -> int:
    """Scalars of `params` that train: the mask's ones on masked leaves, all elsewhere."""
    return int(sum(int(np.sum(m)) if np.ndim(m) else int(np.size(p))
                   for p, m in zip(jax.tree_util.tree_leaves(params),
                                   jax.tree_util.tree_leaves(masks))))


def export_masks(params: Any, masks: Any) -> dict[str, str]:
    """The masks as an export stores them (JSON): "encoder/block_0/.../kernel" -> base64 of
    the packed bits (1 = kept), blocks unstacked as `save_adapter` stores the weights."""
    full = jax.tree_util.tree_map(lambda p, m: np.broadcast_to(np.asarray(m), p.shape),
                                  params, masks)
    flat = traverse_util.flatten_dict(unstack_blocks(full))
    return {"/".join(k): base64.b64encode(np.packbits(np.asarray(v) != 0).tobytes()).decode()
            for k, v in flat.items() if is_prunable(k)}


def check_pruned(trained: Any, record: dict[str, str]) -> None:
    """Raises ValueError naming the tensor when an export's weights are non-zero where its
    stored mask pruned them, or a masked tensor is missing (`trained`: unstacked tree)."""
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(trained)).items()}
    for key, bits in record.items():
        if key not in flat:
            raise ValueError(f"sparsity mask of {key} but no such tensor in the export")
        value = np.asarray(flat[key])
        kept = np.unpackbits(np.frombuffer(base64.b64decode(bits), np.uint8),
                             count=value.size).reshape(value.shape).astype(bool)
        if np.any(value[~kept] != 0):
            raise ValueError(f"{key}: {int(np.sum(value[~kept] != 0))} weights are non-zero "
                             "where the stored sparsity mask pruned them (edited or not "
                             "trained with its mask)")


def keep_pruned(masks: Any) -> optax.GradientTransformation:
    """Multiplies updates by `masks` (a tree like the params, `mask_tree`), so pruned weights
    never move. Chain it *last*: `optax.chain(tx, keep_pruned(masks))`. The masks live in the
    state (a pytree of arrays), not in the compiled step."""

    def init_fn(params):
        del params
        return (masks,)

    def update_fn(updates, state, params=None):
        del params
        (m,) = state
        return apply_masks(updates, m), state

    return optax.GradientTransformation(init_fn, update_fn)
