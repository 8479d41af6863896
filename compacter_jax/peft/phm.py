"""Parameterized hypercomplex multiplication (PHM), pure functions.

A PHM layer maps `in_features = k` to `out_features = d` with

    W = sum_{i<n} A_i ⊗ B_i                     W: [k, d]
    rule A: [n, n, n]      (A_i = rule[i]: [n, n])
    factors B: [n, k/n, d/n]   (full)   or   B_i = left_i @ right_i  (low rank, LPHM)
    left: [n, k/n, r]      right: [n, r, d/n]

with the numpy Kronecker convention (A ⊗ B)[a*K + q, c*P + p] = A[a, c] * B[q, p]
(K = k/n, P = d/n). Two ways to compute `x @ W`:

* materialised: build W (n*k*d flops), then one dense matmul (T*k*d for T tokens);
* factored: reshape x to [..., n, K] and contract with B (or left, right) and A, never
  building W. With low rank, x meets `left` first, so the cost per token is
  r*n*(k + d) + r*n^3 instead of k*d.

`phm_matmul` picks one per (static) shape; see `choose_path` and benchmarks/phm_paths.py.
"""

from __future__ import annotations

from typing import Literal, Union

import jax
import jax.numpy as jnp

Array = jax.Array
Factors = Union[Array, tuple[Array, Array]]
Path = Literal["auto", "materialized", "factored"]


def check_phm_dims(in_features: int, out_features: int, n: int, rank: int | None = None) -> None:
    """Raises ValueError unless n divides both feature sizes and 1 <= rank <= min(k/n, d/n).

    A rank above min(k/n, d/n) cannot raise the rank of B_i, it only adds parameters, so it is
    rejected rather than silently accepted.
    """
    if n < 1:
        raise ValueError(f"PHM n (phm_dim) must be >= 1, got n={n}")
    for field, size in (("in_features", in_features), ("out_features", out_features)):
        if size % n:
            raise ValueError(
                f"PHM layer: {field}={size} is not divisible by n={n}; choose an n that divides "
                f"both in_features={in_features} and out_features={out_features} (or change "
                f"reduction_factor so the bottleneck is a multiple of n)")
    if rank is not None:
        width = min(in_features // n, out_features // n)
        if not 1 <= rank <= width:
            raise ValueError(
                f"PHM layer: rank={rank} must be in [1, min(in_features/n, out_features/n)] = "
                f"[1, {width}] for in_features={in_features}, out_features={out_features}, "
                f"n={n}; lower `rank` (the paper uses rank=1)")


def _check_rule(rule: Array) -> int:
    if rule.ndim != 3 or not rule.shape[0] == rule.shape[1] == rule.shape[2]:
        raise ValueError(f"PHM rule must have shape [n, n, n], got {rule.shape}")
    return rule.shape[0]


def _check_factors(n: int, factors: Array) -> None:
    if factors.ndim != 3 or factors.shape[0] != n:
        raise ValueError(f"PHM factors must have shape [n={n}, in/n, out/n], got {factors.shape}")


def _check_low_rank(n: int, left: Array, right: Array) -> None:
    if (left.ndim != 3 or right.ndim != 3 or left.shape[0] != n or right.shape[0] != n
            or left.shape[2] != right.shape[1]):
        raise ValueError(
            f"PHM low-rank factors must be left [n={n}, in/n, r] and right [n, r, out/n], "
            f"got {left.shape} and {right.shape}")


def low_rank_factors(left: Array, right: Array) -> Array:
    """B_i = left_i @ right_i.  left: [n, K, r], right: [n, r, P] -> B: [n, K, P]."""
    _check_low_rank(left.shape[0], left, right)
    return jnp.einsum("ikr,irp->ikp", left, right)


def kronecker_sum(rule: Array, factors: Array) -> Array:
    """W = sum_i rule[i] ⊗ factors[i].  rule: [n, n, n], factors: [n, K, P] -> W: [n*K, n*P].

    Entry W[a*K + q, c*P + p] = sum_i rule[i, a, c] * factors[i, q, p] (numpy.kron layout).
    """
    n = _check_rule(rule)
    _check_factors(n, factors)
    _, k_per, p_per = factors.shape
    w = jnp.einsum("iac,iqp->aqcp", rule, factors)
    return w.reshape(n * k_per, n * p_per)


def _as_full(factors: Factors) -> Array:
    if isinstance(factors, (tuple, list)):
        return low_rank_factors(*factors)
    return factors


def _split_in(x: Array, n: int, in_features: int) -> Array:
    if x.shape[-1] != in_features:
        raise ValueError(f"PHM input has {x.shape[-1]} features, the weights expect {in_features}")
    return x.reshape(*x.shape[:-1], n, in_features // n)


def phm_matmul_materialized(x: Array, rule: Array, factors: Factors) -> Array:
    """y = x @ W with W built explicitly.  x: [..., k] -> y: [..., d]."""
    w = kronecker_sum(rule, _as_full(factors))
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"PHM input has {x.shape[-1]} features, the weights expect {w.shape[0]}")
    return x @ w


def phm_matmul_factored(x: Array, rule: Array, factors: Factors) -> Array:
    """y = x @ W without building W.  x: [..., k] -> y: [..., d].

    x is viewed as [..., n, K] (index a, q) and y as [..., n, P] (index c, p):
      y[..., c, p] = sum_{i,a,q} x[..., a, q] * rule[i, a, c] * B[i, q, p].
    Low rank (factors = (left, right)): x is contracted with `left` first, so nothing of
    size k*d is ever formed; per token r*n*(k + d) + r*n^3 multiply-adds.
    Full B: the rule is applied on the smaller of the two sides (n^2*min(k, d) + k*d).
    """
    n = _check_rule(rule)
    lead = x.shape[:-1]
    if isinstance(factors, (tuple, list)):
        left, right = factors
        _check_low_rank(n, left, right)
        _, k_per, r = left.shape
        p_per = right.shape[2]
        xs = _split_in(x, n, n * k_per).reshape(-1, k_per)            # [(tokens, a), q]
        # Both big contractions are plain 2-D matmuls (fast on every backend); only the
        # tiny rule contraction in the middle has a batch axis.
        h = xs @ left.transpose(1, 0, 2).reshape(k_per, n * r)         # [(tokens, a), (i, r)]
        h = jnp.einsum("tair,iac->tcir", h.reshape(-1, n, n, r), rule)  # [tokens, c, i, r]
        y = h.reshape(-1, n * r) @ right.reshape(n * r, p_per)         # [(tokens, c), p]
        return y.reshape(*lead, n * p_per)
    _check_factors(n, factors)
    _, k_per, p_per = factors.shape
    xs = _split_in(x, n, n * k_per)
    if k_per <= p_per:   # rule on the input side: n^2*k + k*d
        h = jnp.einsum("...aq,iac->...icq", xs, rule)
        y = jnp.einsum("...icq,iqp->...cp", h, factors)
    else:                # rule on the output side: k*d + n^2*d
        h = jnp.einsum("...aq,iqp->...iap", xs, factors)
        y = jnp.einsum("...iap,iac->...cp", h, rule)
    return y.reshape(*lead, n * p_per)


def path_costs(tokens: int, in_features: int, out_features: int, n: int,
               rank: int | None) -> dict[str, int]:
    """Multiply-add counts of the two paths for `tokens` rows of x (rank None = full B)."""
    k, d = in_features, out_features
    materialized = n * k * d + tokens * k * d
    if rank is None:
        factored = tokens * (k * d + n * n * min(k, d))
    else:
        materialized += k * d * rank // n          # forming B from left @ right
        factored = tokens * rank * (n * (k + d) + n ** 3)
    return {"materialized": materialized, "factored": factored}


# benchmarks/phm_paths.py (CPU, forward + backward, 256 and 4096 tokens): the factored path
# was 1.1-2.6x faster for Compacter's projections (5.7x fewer multiply-adds), 0.7-1.3x for
# low-rank shapes with ~1.7x fewer (n = 12, or r = 8), and 0.15-0.8x for full B (no saving:
# both need k*d per token; small batched einsums run below matmul speed). Hence: factored
# only for low rank and only when it needs this many times fewer multiply-adds.
FACTORED_ADVANTAGE = 4.0


def choose_path(tokens: int, in_features: int, out_features: int, n: int,
                rank: int | None) -> Literal["materialized", "factored"]:
    """The path `phm_matmul(path="auto")` takes: factored iff low rank and its multiply-add
    count is at least FACTORED_ADVANTAGE times smaller than the materialised one."""
    if rank is None:
        return "materialized"
    c = path_costs(tokens, in_features, out_features, n, rank)
    return "factored" if c["factored"] * FACTORED_ADVANTAGE <= c["materialized"] else "materialized"


def phm_matmul(x: Array, rule: Array, factors: Factors, path: Path = "auto") -> Array:
    """y = x @ (sum_i rule[i] ⊗ B_i).  x: [..., k], rule: [n, n, n],
    factors: B [n, k/n, d/n] or (left [n, k/n, r], right [n, r, d/n]) -> y: [..., d].

    path: "materialized", "factored", or "auto" (decided from the static shapes by
    `choose_path`). Both paths give the same values and gradients up to float rounding.
    """
    if path == "auto":
        n = _check_rule(rule)
        if isinstance(factors, (tuple, list)):
            k, r, d = n * factors[0].shape[1], factors[0].shape[2], n * factors[1].shape[2]
        else:
            k, r, d = n * factors.shape[1], None, n * factors.shape[2]
        tokens = 1
        for s in x.shape[:-1]:
            tokens *= s
        path = choose_path(tokens, k, d, n, r)
    if path == "materialized":
        return phm_matmul_materialized(x, rule, factors)
    if path == "factored":
        return phm_matmul_factored(x, rule, factors)
    raise ValueError(f"phm_matmul path must be 'auto', 'materialized' or 'factored', got {path!r}")
