"""The Fastfood projection (Le, Sarlos, Smola 2013) as the original Compacter code uses it for
Intrinsic-SAID (`seq2seq/projections/intrinsic.py`: `fastfood_vars`, `fastfood_torched`), in
pure JAX. It maps a vector of d numbers to D entries without a dense [D, d] matrix:

    P(v) = (H G Pi H B pad(v))[:D] / (divisor * sqrt(D / L)),
    divisor = sqrt(L * sum(G^2)),   L = 2 ** ceil(log2(D))

H is the unnormalised L x L Walsh-Hadamard matrix (Sylvester order), B a +-1 diagonal, Pi a
uniform permutation applied as a gather ((Pi x)[j] = x[Pi[j]]) and G a N(0, 1) diagonal, drawn
once and frozen. A vector longer than L is cut to its first L entries (the original's `F.pad`
with a negative pad); a shorter one is zero-padded. The draws cannot be bit-identical to the
original's torch / numpy RNGs; their distributions are.

Gradients. JAX autodiff gives the true gradient (H is symmetric, so the VJP of `fwht` is
`fwht`). The original's `FastWalshHadamard.backward` returns H g / sqrt(L) although its
forward is unnormalised, i.e. the true gradient times L^-1/2 per transform; with two
transforms per projection the vector's gradient is scaled by 1 / L.
`original_gradient_scale=True` reproduces this (a `jax.custom_vjp` scaling the cotangent of
each transform).

Efficiency. `fwht` never builds an [L, L] matrix: it applies small dense Hadamard blocks
along reshaped axes (H_L = H_m1 (x) H_m2 (x) ...). The first transform acts on a vector
supported on its first m = 2^ceil(log2 d) entries, so H_L (B pad(v)) is the m-point
transform tiled L / m times: only the second transform costs O(L log L), and of it only the
first D outputs are computed (`_fwht_head`). Intrinsic-SAID itself (which tensors, SAID's
scales, the trainable sizes) is `compacter_jax.peft.methods.intrinsic`.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Hadamard block size (log2) of `fwht`, chosen with benchmarks/fastfood.py: on [rows, L] with
# rows * L = 2^25 (L = 2^25, 2^22, 2^20), 2-core CPU, 8x8 blocks took 1.06 / 0.82 / 0.73 CPU-s,
# the radix-2 butterfly 1.10 / 1.03 / 1.00, 2x2 blocks 1.94 / 1.38 / 1.25, 16x16 1.26 / 0.90 / 1.00.
FWHT_BLOCK_BITS = 3
# Shortest random draw (one compiled draw serves all tensors with L <= MIN_DRAW).
MIN_DRAW = 4096


# ----------------------------------------------------------------------------- transform


def _hadamard(m: int) -> np.ndarray:
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return h


def _log2_exact(n: int, what: str) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}; pad it (fastfood_length)")
    return n.bit_length() - 1


def _fwht(x: Array, block_bits: int) -> Array:
    length = x.shape[-1]
    bits = _log2_exact(length, "fwht: the size of the last axis")
    flat = x.reshape(-1, length)
    done = 0  # low bits already transformed
    while done < bits:
        b = min(block_bits, bits - done)
        m, inner = 1 << b, 1 << done
        blocks = flat.reshape(-1, m, inner)  # axis 1 is bits [done, done + b) of the index
        h = jnp.asarray(_hadamard(m), x.dtype)
        # HIGHEST: no reduced-precision (e.g. TF32) matmul on accelerators; H is exact.
        flat = jnp.einsum("aic,ij->ajc", blocks, h,
                          precision=jax.lax.Precision.HIGHEST).reshape(flat.shape)
        done += b
    return flat.reshape(x.shape)


def _fwht_head(x: Array, count: int) -> Array:
    """(x @ H_L)[..., :count] without the outputs past `count`.

    H_L = [[H, H], [H, -H]] (H = H_{L/2}): the first half is (a + b) H, the second (a - b) H;
    a half that is not needed is never transformed. With D = 0.56 L (T5-base's FFN and
    attention kernels) this skips ~45% of the arithmetic (~30% of the time on CPU).
    """
    length = x.shape[-1]
    if count >= length or length <= 1 << FWHT_BLOCK_BITS:
        return _fwht(x, FWHT_BLOCK_BITS)[..., :count]
    half = length // 2
    a, b = x[..., :half], x[..., half:]
    if count <= half:
        return _fwht_head(a + b, count)
    return jnp.concatenate([_fwht(a + b, FWHT_BLOCK_BITS), _fwht_head(a - b, count - half)],
                           axis=-1)


@jax.custom_vjp
def _scale_cotangent(x: Array, scale: Array) -> Array:
    return x


def _scale_cotangent_fwd(x, scale):
    return x, scale


def _scale_cotangent_bwd(scale, g):
    return g * scale.astype(g.dtype), jnp.zeros_like(scale)


_scale_cotangent.defvjp(_scale_cotangent_fwd, _scale_cotangent_bwd)


def fwht(x: Array, *, original_gradient_scale: bool = False) -> Array:
    """Unnormalised fast Walsh-Hadamard transform along the last axis: y = x @ H_L.

    Args:
      x: [..., L] float array, L a power of two.
      original_gradient_scale: the VJP returns H g / sqrt(L) (the original code's backward)
        instead of the true H g.
    Returns:
      [..., L], same dtype; H in Sylvester (natural) order, H[i, j] = (-1)^popcount(i & j).
    """
    y = _fwht(x, FWHT_BLOCK_BITS)
    if original_gradient_scale:
        y = _scale_cotangent(y, jnp.asarray(x.shape[-1] ** -0.5, jnp.float32))
    return y


# ----------------------------------------------------------------------------- Fastfood


def fastfood_length(out_size: int) -> int:
    """L = 2 ** ceil(log2(D)) computed as the original does (float logs, exact for D < 2**29)."""
    if out_size < 1:
        raise ValueError(f"Fastfood out_size must be >= 1, got {out_size}")
    return 2 ** int(np.ceil(np.log(out_size) / np.log(2)))


@flax.struct.dataclass
class FastfoodConstants:
    """Frozen Fastfood constants of one tensor, or of a stack of tensors (leading axes).

    Attributes:
      signs: int8 [..., L], the +-1 diagonal B.
      permutation: int32 [..., L], Pi as gather indices.
      gaussian: float32 [..., L], the N(0, 1) diagonal G.
      divisor: float32 [...], sqrt(L * sum(G^2)).
      out_size: D, the projected tensor's number of entries (static).
    """
    signs: Array
    permutation: Array
    gaussian: Array
    divisor: Array
    out_size: int = flax.struct.field(pytree_node=False)

    @property
    def length(self) -> int:
        return self.signs.shape[-1]


@functools.partial(jax.jit, static_argnums=2)
def _random_draws(key: Array, salt: Array, length: int) -> tuple[Array, Array, Array]:
    k_signs, k_perm, k_gauss = jax.random.split(jax.random.fold_in(key, salt), 3)
    return (jax.random.bernoulli(k_signs, 0.5, (length,)),
            jax.random.normal(k_gauss, (length,), jnp.float32),
            jax.random.bits(k_perm, (2, length), jnp.uint32))


def draw_constants(key: Array, out_size: int, salt: int = 0) -> dict[str, np.ndarray]:
    """B, Pi, G and the divisor for a tensor of `out_size` entries, drawn from
    fold_in(key, salt), as numpy arrays ({"signs", "permutation", "gaussian", "divisor"})."""
    length = fastfood_length(out_size)
    # Small tensors take the head of one MIN_DRAW-long draw: one compile serves them all.
    drawn = _random_draws(key, salt, max(length, MIN_DRAW))
    heads, gaussian, bits = (np.asarray(a)[..., :length] for a in drawn)
    # A uniform permutation as the argsort of 64 random bits per entry (ties ~ L^2 / 2^65):
    # unique given the bits, so the same on every platform and numpy version (checkpoints keep
    # only the trainable tree; constants are re-drawn from the key). On the host, because
    # jax.random.permutation's repeated XLA sorts take ~45 s at L = 2^25 on CPU.
    hi, lo = bits.astype(np.uint64)
    permutation = np.argsort((hi << np.uint64(32)) | lo, kind="stable").astype(np.int32)
    divisor = np.sqrt(np.float32(length) * np.sum(np.square(gaussian), dtype=np.float32))
    return {"signs": np.where(heads, 1, -1).astype(np.int8), "permutation": permutation,
            "gaussian": gaussian, "divisor": np.float32(divisor)}


def make_fastfood(key: Array, out_size: int) -> FastfoodConstants:
    """Draws one tensor's Fastfood constants (B, Pi, G, divisor) from a JAX PRNG key.

    Args:
      key: a jax.random key.
      out_size: D, the number of entries of the projected tensor.
    Returns:
      FastfoodConstants with [L] arrays, L = fastfood_length(D); deterministic in (key, D).
      (B, G and the permutation's random bits come from fold_in(key, 0); the permutation is
      their argsort on the host.)
    """
    drawn = draw_constants(key, out_size)
    return FastfoodConstants(**{k: jnp.asarray(v) for k, v in drawn.items()}, out_size=out_size)


def fastfood_project(vector: Array, constants: FastfoodConstants, *,
                     original_gradient_scale: bool = False) -> Array:
    """P(vector) = (H G Pi H B pad(vector))[:D] / (divisor * sqrt(D / L)), in float32.

    Args:
      vector: [d] the intrinsic vector (cut to its first L entries when d > L).
      constants: one tensor's constants ([L] arrays) or a stack of them ([..., L]).
      original_gradient_scale: scale the cotangent of each transform by L^-1/2 as the
        original's backward does (the vector's gradient becomes 1/L of the true one).
    Returns:
      [..., D] float32.
    """
    if vector.ndim != 1:
        raise ValueError(f"fastfood_project: vector must be 1-D [d], got shape {vector.shape}")
    return _project(vector, constants, original_gradient_scale)


# Saves no residuals for the backward pass: the projection is linear, so its VJP needs only
# the constants and the index Pi mod m (re-derived, instead of keeping an int32 [..., L] copy).
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable,
                   static_argnums=(2,))
def _project(vector: Array, constants: FastfoodConstants, original_gradient_scale: bool):
    length, out_size = constants.length, constants.out_size
    x = vector.astype(jnp.float32)[:length]
    support = 1 << (x.shape[0] - 1).bit_length()  # next power of two >= len(x), <= L
    x = jnp.pad(x, (0, support - x.shape[0]))
    # H_L applied to B x supported on the first `support` entries = H_support (B x) tiled.
    first = _fwht(x * constants.signs[..., :support].astype(jnp.float32), FWHT_BLOCK_BITS)
    grad_scale = jnp.asarray(length ** -0.5, jnp.float32)
    if original_gradient_scale:
        first = _scale_cotangent(first, grad_scale)
    index = jnp.bitwise_and(constants.permutation, support - 1)  # Pi[j] mod support
    mixed = jnp.take_along_axis(first, index, axis=-1, mode="promise_in_bounds")
    second = _fwht_head(mixed * constants.gaussian, out_size)
    if original_gradient_scale:
        second = _scale_cotangent(second, grad_scale)
    norm = constants.divisor * np.float32(math.sqrt(out_size / length))
    return second / norm[..., None]
