"""Ladder Side-Tuning (Sung, Cho and Bansal 2022, arXiv 2206.06522): a small T5 beside the
frozen one, fed through gated "ladder" connections from every backbone block.

The side network is a T5 of the backbone's shape with d_model, d_kv and d_ff divided by the
reduction factor r (same heads). Per stack (encoder, decoder):

    s_0     = first_downsample(x_0)                      x_0: the backbone stack's input
    s       = g_i * s + (1 - g_i) * down_i(x_{i+1})       g_i = sigmoid(gate_i / T), before
    s       = side_block_i(s)                             every kept side block i
    out     = side_final_layer_norm(s)

x_{i+1} is the backbone's block i output (`stop_gradient`: nothing flows back into the
backbone, so its forward never enters the backward pass). The side decoder cross-attends to
the side encoder's output; its output is upsampled to d_model and goes through the frozen
lm_head (with T5 v1.0's d_model**-0.5 scaling). Side blocks can be dropped (the paper's T5-base
runs keep 9 of 12: `drop_every=4` drops blocks 0, 4, 8); a dropped block has no side block,
down-projection or gate. Trainable: everything of the side network (blocks, layer norms,
relative attention bias, down/up-projections, gates); the backbone and lm_head are frozen.
The side stacks are `models.T5Stack`s (masks, packed segments, KV cache for free); unlike the
authors' code, that adds one dropout on s_0 in training (none at evaluation). The backbone
may be scanned (`scan_layers`; the side stacks never are): its taps are then the scan's
stacked block outputs, one loop instead of n unrolled blocks (XLA:CPU otherwise computes
every block's dropout bits up front: see docs/benchmarks.md, LST), and the pruned init reads
the stacked blocks (`blocks/...[i]`), the same side network as from the unscanned backbone.

Initialisation (`side_init="pruned"`): the side blocks start as the backbone structurally
pruned to 1/r of its width, chained as in the authors' code (the embedding's kept d_model
columns select the inputs of the first projections, each projection group keeps its output
units of largest L1 importance, which select the inputs of the next). The paper's importance
is Fisher information from training batches (`fisher_importance`, passed to
`init_side_from_backbone`); `prepare` uses the weight magnitude (the authors' code's
importance when none is given), so the default init needs no data. "random" keeps the
fresh initialisation. Down/up-projections and gates are always fresh (gates at
sigmoid(0) = 0.5).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models import Site, T5Config, T5Hooks
from compacter_jax.models.t5_stack import Encoded, Packing, T5Stack
from compacter_jax.peft.method import Method, as_tuple

SIDE_INITS = ("pruned", "random")


# --- configuration -------------------------------------------------------------------------
def kept_layers(num_layers: int, drop_every: int, side_layers: tuple[int, ...]) -> tuple[int, ...]:
    """Backbone blocks that get a side block: `side_layers` if given, else all but the blocks
    0, drop_every, 2 * drop_every, ... (drop_every 0: all)."""
    if side_layers:
        return tuple(sorted(set(side_layers)))
    return tuple(i for i in range(num_layers) if not (drop_every and i % drop_every == 0))


def side_config(t5: T5Config, reduction_factor: int, encoder_layers: int,
                decoder_layers: int) -> T5Config:
    """The side network's T5 shape: widths divided by r, the kept number of blocks."""
    r = reduction_factor
    return dataclasses.replace(t5, d_model=t5.d_model // r, d_kv=t5.d_kv // r,
                               d_ff=t5.d_ff // r, num_layers=encoder_layers,
                               num_decoder_layers=decoder_layers, scan_layers=False)


# --- modules (thin shells) -----------------------------------------------------------------
class LadderGate(nn.Module):
    """s' = g * s + (1 - g) * (x @ kernel + bias), g = sigmoid(gate / temperature).

    s: side state [B, T, d_side]; x: a backbone state [B, T, d_model] (gradient stopped).
    Params: `kernel` [d_model, d_side], `bias` [d_side] (if `bias`), `gate` [] (scalar).
    """

    temperature: float
    gate_init: float
    bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, s: jax.Array, x: jax.Array) -> jax.Array:
        down = nn.Dense(s.shape[-1], use_bias=self.bias, dtype=self.dtype, name="down")(
            jax.lax.stop_gradient(x))
        gate = self.param("gate", nn.initializers.constant(self.gate_init), (), jnp.float32)
        g = jax.nn.sigmoid(gate / self.temperature).astype(s.dtype)
        return g * s + (1 - g) * down.astype(s.dtype)


@dataclasses.dataclass(frozen=True)
class LadderHooks(T5Hooks):
    """The hooks of a side `T5Stack`: a `LadderGate` before every block, nothing else."""

    temperature: float
    gate_init: float
    bias: bool
    dtype: str | None = None

    def ladder(self, site: Site, name: str) -> nn.Module:
        return LadderGate(self.temperature, self.gate_init, self.bias,
                          jnp.dtype(self.dtype or "float32"), name=name)

    def uniform_over_layers(self) -> bool:
        return False


class SideStack(nn.Module):
    """The side encoder or decoder: downsample the stack input, run the reduced `T5Stack`
    with the ladder taps of the kept blocks, (decoder) upsample to the backbone's d_model.

    Called with `taps` (the backbone stack's n + 1 states [B, T, D], see `T5Stack`) and the
    masks / packing ids of the backbone stack (mask [B, T]: the raw attention mask); returns
    [B, T, d_side] (encoder) or [B, T, D] (decoder).
    """

    method: "LadderSideTuning"
    config: T5Config  # the backbone's
    is_decoder: bool

    @nn.compact
    def __call__(self, taps, mask, *args, segment_ids=None, positions=None,
                 enc_segment_ids=None):
        """Encoder: (taps, mask, deterministic); decoder: (taps, mask, side_encoder_out,
        encoder_mask, deterministic, decode) (the root model's call, see models/hooks.py)."""
        m, cfg = self.method, self.config
        if self.is_decoder:
            enc, enc_mask, deterministic, decode = args
        else:
            (deterministic,), enc, enc_mask, decode = args, None, None, False
        layers = m.layers(cfg, self.is_decoder)
        side_cfg = m.side_config(cfg)
        dense = lambda n, name: nn.Dense(n, use_bias=m.sampling_bias,  # noqa: E731
                                         dtype=cfg.compute_dtype, name=name)
        taps = [jax.lax.stop_gradient(t) for t in taps]
        s = dense(side_cfg.d_model, "first_downsample")(taps[0])
        hooks = LadderHooks(m.gate_temperature, m.gate_init, m.sampling_bias, cfg.dtype)
        encoded = Encoded(enc, enc_mask, enc_segment_ids) if self.is_decoder else None
        stack = T5Stack(side_cfg, hooks, is_decoder=self.is_decoder, name="stack")
        h, _ = stack(s, mask, encoded, packing=Packing(segment_ids, positions),
                     ladder=[taps[i + 1] for i in layers], deterministic=deterministic,
                     decode=decode)
        return dense(cfg.d_model, "upsample")(h) if self.is_decoder else h


@dataclasses.dataclass(frozen=True)
class LSTHooks(T5Hooks):
    method: "LadderSideTuning"

    def side_network(self, config: T5Config, is_decoder: bool, name: str) -> nn.Module:
        return SideStack(self.method, config, is_decoder, name=name)

    def uniform_over_layers(self) -> bool:
        # Nothing goes into the backbone's blocks: a scanned backbone hands the side network
        # its per-block taps as the scan's stacked outputs (the side stacks never scan).
        return True


# --- the method ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LadderSideTuning(Method):
    """Attributes:
      reduction_factor: r; the side network has d_model / r, d_kv / r, d_ff / r (paper: 8;
        its sweep: 4, 8, 16, 32).
      drop_every: drop the side blocks 0, k, 2k, ... of each stack (0: keep all; the paper's
        T5-base runs: 4, i.e. blocks 1-3, 5-7, 9-11 kept).
      side_layers: explicit kept blocks (same in both stacks; overrides drop_every).
      gate_temperature: T of the gates sigmoid(gate / T) (authors' code: 0.1).
      gate_init: initial gate parameter (0: the gates start at 0.5).
      sampling_bias: biases in the down/up-projections (authors' runs: True).
      side_init: "pruned" (side blocks from the magnitude-pruned backbone) or "random".
    """

    reduction_factor: int = 8
    drop_every: int = 0
    side_layers: tuple[int, ...] = ()
    gate_temperature: float = 0.1
    gate_init: float = 0.0
    sampling_bias: bool = True
    side_init: str = "pruned"

    task_prefix: ClassVar[bool] = True  # the authors' code prefixes inputs unless adapters

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "side_layers", as_tuple(self.side_layers))
        if self.reduction_factor < 1:
            raise ValueError(f"{self.name}: reduction_factor must be >= 1, got "
                             f"{self.reduction_factor}")
        if self.drop_every < 0 or self.drop_every == 1:
            raise ValueError(f"{self.name}: drop_every must be 0 (keep all) or >= 2, got "
                             f"{self.drop_every}")
        if any(int(i) < 0 for i in self.side_layers):
            raise ValueError(f"{self.name}: side_layers must be block indices >= 0, got "
                             f"{self.side_layers}")
        if not self.gate_temperature > 0:
            raise ValueError(f"{self.name}: gate_temperature must be > 0, got "
                             f"{self.gate_temperature}")
        if self.side_init not in SIDE_INITS:
            raise ValueError(f"{self.name}: side_init must be one of {SIDE_INITS}, got "
                             f"{self.side_init!r}")

    def layers(self, t5: T5Config, is_decoder: bool) -> tuple[int, ...]:
        n = t5.num_decoder_layers if is_decoder else t5.num_layers
        return kept_layers(n, self.drop_every, self.side_layers)

    def side_config(self, t5: T5Config) -> T5Config:
        return side_config(t5, self.reduction_factor, len(self.layers(t5, False)),
                           len(self.layers(t5, True)))

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return LSTHooks(self)

    def validate(self, t5: T5Config) -> None:
        r = self.reduction_factor
        for field in ("d_model", "d_kv", "d_ff"):
            if getattr(t5, field) % r:
                raise ValueError(f"{self.name}: reduction_factor={r} does not divide the model's "
                                 f"{field}={getattr(t5, field)}; pick a divisor")
        for stack, n in (("encoder", t5.num_layers), ("decoder", t5.num_decoder_layers)):
            layers = kept_layers(n, self.drop_every, self.side_layers)
            if not layers or layers[-1] >= n:
                raise ValueError(f"{self.name}: side_layers={self.side_layers} / drop_every="
                                 f"{self.drop_every} leave no valid side block in the {n}-block "
                                 f"{stack}; use indices in 0..{n - 1}")

    def prepare(self, params: dict, t5: T5Config) -> dict:
        if self.side_init == "random":
            return params
        return init_side_from_backbone(params, t5, self)


# --- structured pruning of the backbone (numpy, once at initialisation) --------------------
def _keep(importance: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) of the n output units (columns of [in, out]) of largest L1 norm."""
    norms = np.abs(importance).sum(axis=0)
    return np.sort(np.argsort(-norms, kind="stable")[:n])


def _group(kernels: list[np.ndarray], rows: list[np.ndarray], n_out: int,
           scores: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """Prunes the inputs of projections that share outputs (q/k/v, wi_0/wi_1) by `rows`, then
    keeps the n_out outputs of largest L1 norm of the elementwise product of their importance
    `scores` (same shapes as the kernels)."""
    cut = [k[r] for k, r in zip(kernels, rows)]
    cols = _keep(np.prod(np.stack([s[r] for s, r in zip(scores, rows)]), axis=0), n_out)
    return [c[:, cols] for c in cut], cols


def _block(stack: dict, i: int) -> dict:
    """Block i's params of a backbone stack, unscanned (`block_{i}`) or scanned (`blocks`,
    every leaf stacked on a leading layer axis)."""
    if "blocks" in stack:
        return jax.tree_util.tree_map(lambda a: a[i], stack["blocks"])
    return stack[f"block_{i}"]


def prune_stack(stack: dict, t5: T5Config, r: int, is_decoder: bool, idx: np.ndarray,
                enc_idx: np.ndarray | None, importance: dict | None = None
                ) -> tuple[dict, np.ndarray]:
    """Pruned copies of every block of one backbone stack (numpy).

    Args:
      stack: the backbone stack's params (`block_{i}/...` or, scanned, `blocks/...` with a
        leading layer axis; `final_layer_norm`, ...).
      importance: a tree like `stack` scoring each weight (None: the weights themselves).
      idx: the kept d_model indices of the stack's input (from the embedding).
      enc_idx: (decoder) the kept d_model indices of the encoder output (cross k/v inputs).
    Returns:
      ({block_i: pruned block tree, "final_layer_norm": ...}, kept indices of the output).
    """
    d, inner, ff = t5.d_model // r, t5.num_heads * t5.d_kv // r, t5.d_ff // r
    n = t5.num_decoder_layers if is_decoder else t5.num_layers
    out: dict = {}
    importance = stack if importance is None else importance
    for i in range(n):
        src, dst, imp = _block(stack, i), {}, _block(importance, i)
        attn = [("layer_0", "SelfAttention")]
        if is_decoder:
            attn.append(("layer_1", "EncDecAttention"))
        for layer, name in attn:
            a, ai = src[layer][name], imp[layer][name]
            kv_rows = enc_idx if name == "EncDecAttention" else idx
            (q, k, v), heads = _group([np.asarray(a[p]["kernel"]) for p in "qkv"],
                                      [idx, kv_rows, kv_rows], inner,
                                      [np.asarray(ai[p]["kernel"]) for p in "qkv"])
            (o,), new_idx = _group([np.asarray(a["o"]["kernel"])], [heads], d,
                                   [np.asarray(ai["o"]["kernel"])])
            norm = np.asarray(src[layer]["layer_norm"]["scale"])[idx]
            dst[layer] = {"layer_norm": {"scale": norm},
                          name: {"q": {"kernel": q}, "k": {"kernel": k}, "v": {"kernel": v},
                                 "o": {"kernel": o}}}
            idx = new_idx
        layer = "layer_2" if is_decoder else "layer_1"
        f, fi = src[layer]["DenseReluDense"], imp[layer]["DenseReluDense"]
        wi = ["wi_0", "wi_1"] if t5.is_gated else ["wi"]
        ins, hidden = _group([np.asarray(f[p]["kernel"]) for p in wi], [idx] * len(wi), ff,
                             [np.asarray(fi[p]["kernel"]) for p in wi])
        (wo,), new_idx = _group([np.asarray(f["wo"]["kernel"])], [hidden], d,
                                [np.asarray(fi["wo"]["kernel"])])
        dst[layer] = {"layer_norm": {"scale": np.asarray(src[layer]["layer_norm"]["scale"])[idx]},
                      "DenseReluDense": {**{p: {"kernel": w} for p, w in zip(wi, ins)},
                                         "wo": {"kernel": wo}}}
        idx = new_idx
        out[f"block_{i}"] = dst
    out["final_layer_norm"] = {"scale": np.asarray(stack["final_layer_norm"]["scale"])[idx]}
    return out, idx


def init_side_from_backbone(params: dict, t5: T5Config, method: LadderSideTuning,
                            importance: dict | None = None) -> dict:
    """`params` with the side blocks, layer norms and relative attention biases copied from
    the pruned backbone (block kept[j] of a stack -> side block j).

    `importance`: a tree like the backbone's params scoring every weight, e.g. the paper's
    Fisher information (`fisher_importance`); None: the weights' magnitude."""
    if "side_encoder" not in params:
        raise ValueError(f"{method.name}: params have no side network (built without the LST "
                         "hooks?)")
    r = method.reduction_factor
    imp = params if importance is None else jax.tree_util.tree_map(np.asarray, importance)
    emb_idx = _keep(np.asarray(imp["shared"]["embedding"]), t5.d_model // r)
    enc, enc_idx = prune_stack(params["encoder"], t5, r, False, emb_idx, None, imp["encoder"])
    dec, _ = prune_stack(params["decoder"], t5, r, True, emb_idx, enc_idx, imp["decoder"])
    flat = traverse_util.flatten_dict(params)
    for name, pruned, is_dec in (("encoder", enc, False), ("decoder", dec, True)):
        side = {"final_layer_norm": pruned["final_layer_norm"],
                "relative_attention_bias": {
                    "embedding": np.asarray(params[name]["relative_attention_bias"]["embedding"])}}
        for j, i in enumerate(method.layers(t5, is_dec)):
            side[f"block_{j}"] = pruned[f"block_{i}"]
        for path, value in traverse_util.flatten_dict(side).items():
            key = (f"side_{name}", "stack") + path
            old = flat[key]
            if old.shape != value.shape:
                raise ValueError(f"{method.name}: pruned {'/'.join(key)} has shape "
                                 f"{value.shape}, the side network {old.shape}")
            flat[key] = jnp.asarray(value, old.dtype)
    return traverse_util.unflatten_dict(flat)


def fisher_importance(loss_fn, params: Any, batches) -> Any:
    """The paper's importance: the empirical Fisher information of every parameter, the sum
    over `batches` of the squared gradient of `loss_fn(params, batch)` (a scalar; the
    authors use 1,024 training examples, one per batch, with their labels).

    Returns a tree like `params` (float32). Pass it to `init_side_from_backbone`."""
    grad = jax.jit(jax.grad(loss_fn))
    total = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    for batch in batches:
        total = jax.tree_util.tree_map(lambda t, g: t + jnp.square(g.astype(jnp.float32)),
                                       total, grad(params, batch))
    return total
