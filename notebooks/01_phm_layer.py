# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The PHM layer: a weight matrix built from Kronecker products
#
# Compacter replaces the two dense projections of an adapter with *parameterized hypercomplex
# multiplication* (PHM) layers. A PHM layer from `k` to `d` features never stores its weight
# `W` (shape `[k, d]`); it stores `n` small "rule" matrices `A_i` (`[n, n]`) and `n` factor
# matrices `B_i` (`[k/n, d/n]`), and
#
# $$W = \sum_{i=1}^{n} A_i \otimes B_i .$$
#
# Compacter goes further: every `B_i` is rank one, `B_i = s_i t_iᵀ` (the "LPHM" layer), and
# one set of rules `A_i` is shared by all adapters of the model.
#
# This notebook builds `W` for a small example and draws it, checks the library against
# `numpy.kron`, counts parameters as a function of `n` and the rank, and checks that the two
# ways of computing `x @ W` (materialise `W`, or contract the factors directly) agree.
# Everything runs on the CPU in a few seconds.

# %%
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from compacter_jax.peft import phm
from compacter_jax.peft.layers import PHMLinear

print("jax", jax.__version__, "on", jax.devices()[0].platform)

# %% [markdown]
# ## 1. `W = Σ A_i ⊗ B_i` for a small example
#
# Take `n = 3`, `k = 6` input and `d = 9` output features, so each `A_i` is `3×3` and each
# `B_i` is `(k/n)×(d/n) = 2×3`. In the library the rules are one array `rule` of shape
# `[n, n, n]` (`rule[i] = A_i`) and the factors one array `factors` of shape `[n, k/n, d/n]`.

# %%
n, k, d = 3, 6, 9
rng = np.random.default_rng(0)
rule = rng.normal(size=(n, n, n)).astype(np.float32)              # A_i = rule[i]
factors = rng.normal(size=(n, k // n, d // n)).astype(np.float32)  # B_i = factors[i]

W = np.asarray(phm.kronecker_sum(jnp.asarray(rule), jnp.asarray(factors)))
print("W shape:", W.shape)

# %%
fig = plt.figure(figsize=(12, 6.5), constrained_layout=True)
grid = fig.add_gridspec(n, 4, width_ratios=[1, 1, 2, 3])
lim = float(np.abs(W).max())
kron_terms = [np.kron(rule[i], factors[i]) for i in range(n)]
for i in range(n):
    for col, (mat, title) in enumerate([(rule[i], f"$A_{i + 1}$  [{n}×{n}]"),
                                        (factors[i], f"$B_{i + 1}$  [{k // n}×{d // n}]"),
                                        (kron_terms[i], f"$A_{i + 1} \\otimes B_{i + 1}$  [{k}×{d}]")]):
        ax = fig.add_subplot(grid[i, col])
        ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
ax = fig.add_subplot(grid[:, 3])
im = ax.imshow(W, cmap="RdBu_r", vmin=-lim, vmax=lim)
ax.set_title(f"$W = \\sum_i A_i \\otimes B_i$  [{k}×{d}]")
# The block structure: block (a, c) of W is sum_i A_i[a, c] * B_i.
for edge in range(1, n):
    ax.axhline(edge * k // n - 0.5, color="k", lw=1)
    ax.axvline(edge * d // n - 0.5, color="k", lw=1)
ax.set_xticks([]), ax.set_yticks([])
fig.colorbar(im, ax=ax, shrink=0.6)
plt.show()

# %% [markdown]
# Each Kronecker product repeats `B_i` in an `n×n` grid of blocks, scaled by the entries of
# `A_i`; block `(a, c)` of `W` is `Σ_i A_i[a, c] · B_i`. So the rules decide how the same few
# "block patterns" are mixed across the whole matrix.
#
# **Check against numpy.** `phm.kronecker_sum` is an einsum plus a reshape; it must equal the
# literal definition with `numpy.kron`, entry by entry (float32, so a tolerance of a few ulps):

# %%
W_numpy = sum(kron_terms)
np.testing.assert_allclose(W, W_numpy, rtol=1e-6, atol=1e-6)
# The layout, spelled out for one entry: W[a*K + q, c*P + p] = sum_i A_i[a, c] * B_i[q, p].
K, P = k // n, d // n
a, q, c, p = 2, 1, 0, 2
assert np.isclose(W[a * K + q, c * P + p], sum(rule[i, a, c] * factors[i, q, p] for i in range(n)))
print("kronecker_sum == sum(np.kron(A_i, B_i)); max |diff| =", np.abs(W - W_numpy).max())

# %% [markdown]
# ## 2. Low-rank factors: `B_i = s_i t_iᵀ`
#
# Compacter's LPHM layer stores `B_i` as a product of two thin matrices, `left` `[n, k/n, r]`
# and `right` `[n, r, d/n]`, with rank `r = 1` in the paper: `B_i = s_i t_iᵀ` is an outer
# product. `phm.low_rank_factors(left, right)` forms the `B_i`.

# %%
r = 1
left = rng.normal(size=(n, k // n, r)).astype(np.float32)    # s_i as columns
right = rng.normal(size=(n, r, d // n)).astype(np.float32)   # t_i as rows
B = np.asarray(phm.low_rank_factors(jnp.asarray(left), jnp.asarray(right)))
for i in range(n):
    np.testing.assert_allclose(B[i], np.outer(left[i, :, 0], right[i, 0, :]), rtol=1e-6, atol=1e-6)
print("B_i = s_i t_i^T for every i; ranks:", [int(np.linalg.matrix_rank(b)) for b in B])

# %% [markdown]
# Since `rank(A ⊗ B) = rank(A)·rank(B)`, each term of the sum has rank at most `n·r`, and
# `W` at most `n²·r`, however large `k` and `d` are. For a `32×32` layer with `n = 4`, `r = 1`
# that bound is 16:

# %%
n2, k2, d2 = 4, 32, 32
rule2 = rng.normal(size=(n2, n2, n2))
B2 = rng.normal(size=(n2, k2 // n2, 1)) @ rng.normal(size=(n2, 1, d2 // n2))  # rank-1 B_i
W_lr = sum(np.kron(rule2[i], B2[i]) for i in range(n2))  # float64: exact rank, not float32 noise
rank_lr = int(np.linalg.matrix_rank(W_lr))
print(f"rank of a {k2}x{d2} LPHM weight (n={n2}, r=1): {rank_lr} (bound n^2*r = {n2 * n2})")
assert rank_lr <= n2 * n2

# %% [markdown]
# ## 3. The Flax layer `PHMLinear`
#
# `PHMLinear(features_out, n, rank)` owns `phm_rule` `[n, n, n]` (unless a shared rule is
# passed in, as Compacter does), `phm_left` / `phm_right` (rank `r`) or `phm_factors`
# (`rank=None`, the full-`B` PHM-Adapter), and a bias. Its output must be
# `x @ Σ np.kron(A_i, s_i t_iᵀ) + b`, computed here with numpy only:

# %%
layer = PHMLinear(features_out=24, n=4, rank=1)
x = jax.random.normal(jax.random.PRNGKey(1), (5, 64))
variables = layer.init(jax.random.PRNGKey(2), x)
print({name: tuple(v.shape) for name, v in variables["params"].items()})

# The bias starts at zero; give it values so that the check covers it too.
params = dict(variables["params"])
params["bias"] = jax.random.normal(jax.random.PRNGKey(3), (24,))
y = np.asarray(layer.apply({"params": params}, x))

p_np = {name: np.asarray(v, np.float64) for name, v in params.items()}
W_ref = sum(np.kron(p_np["phm_rule"][i], p_np["phm_left"][i] @ p_np["phm_right"][i]) for i in range(4))
y_ref = np.asarray(x, np.float64) @ W_ref + p_np["bias"]
np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
print("PHMLinear(x) == x @ sum(np.kron(A_i, s_i t_i^T)) + b; max |diff| =", np.abs(y - y_ref).max())

# %% [markdown]
# ## 4. Parameter count against `n` and the rank
#
# For a layer from `k` to `d` features (bias left out):
#
# | layer | parameters |
# |---|---|
# | dense | `k·d` |
# | PHM (full `B_i`) | `n · (k/n)(d/n) + n³ = k·d/n + n³` |
# | LPHM (rank `r`) | `n · r · (k/n + d/n) + n³ = r·(k + d) + n³` |
#
# The `n³` rule parameters are paid once per layer (PHM-Adapter) or once per *model* when the
# rule is shared (Compacter). Below: Compacter's down projection of T5-base, `768 → 24`, and
# a square `768 → 768` layer, for every `n` that divides both sizes. The formulas are checked
# against the parameter shapes of `PHMLinear` itself (`jax.eval_shape`, no memory allocated).


# %%
def phm_count(k: int, d: int, n: int, rank: int | None) -> int:
    """Parameters of a PHM layer without bias: k*d/n + n^3 (full B) or r*(k+d) + n^3."""
    return (k * d // n if rank is None else rank * (k + d)) + n ** 3


def layer_count(k: int, d: int, n: int, rank: int | None) -> int:
    """The same count, read off the parameter shapes PHMLinear creates (bias excluded)."""
    shapes = jax.eval_shape(PHMLinear(d, n=n, rank=rank, use_bias=False).init,
                            jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, k), jnp.float32))
    return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
for ax, (k, d) in zip(axes, [(768, 24), (768, 768)]):
    ns = [m for m in range(1, min(k, d) + 1) if k % m == 0 and d % m == 0 and m <= 32]
    ax.plot(ns, [k * d] * len(ns), "k--", label="dense  k·d")
    ax.plot(ns, [phm_count(k, d, m, None) for m in ns], "o-", label="PHM  k·d/n + n³")
    for rank in (1, 4):
        valid = [m for m in ns if rank <= min(k, d) // m]
        ax.plot(valid, [phm_count(k, d, m, rank) for m in valid], "s-",
                label=f"LPHM r={rank}  r(k+d) + n³")
    for m in ns:  # the formulas are what the layer allocates
        assert phm_count(k, d, m, None) == layer_count(k, d, m, None), (k, d, m)
        if min(k, d) // m >= 1:
            assert phm_count(k, d, m, 1) == layer_count(k, d, m, 1), (k, d, m)
    ax.set(xscale="log", yscale="log", xlabel="n", ylabel="parameters",
           title=f"PHM layer {k} → {d}")
    ax.set_xticks(ns, [str(m) for m in ns])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %%
k, d = 768, 24
print(f"{'n':>3} {'dense':>8} {'PHM':>8} {'LPHM r=1':>9}")
for m in (1, 2, 4, 8, 12, 24):
    print(f"{m:>3} {k * d:>8,} {phm_count(k, d, m, None):>8,} {phm_count(k, d, m, 1):>9,}")

# %% [markdown]
# Full-`B` PHM divides the dense count by `n`, until the `n³` of the rule takes over (the
# PHM-Adapter uses `n = 12`). The rank-one LPHM count is `k + d + n³`, almost independent of
# `n` while `n³` is small. Compacter's down projection of T5-base (`768 → 24`, `n = 4`) has
# 768 + 24 = 792 factor parameters and 24 biases, the 816 of the paper's budget; its 64 rule parameters
# are shared with every other adapter of the model.

# %% [markdown]
# ## 5. Two ways to compute `x @ W`
#
# `phm.phm_matmul(x, rule, factors, path=...)` either *materialises* `W` and does one dense
# matmul, or takes the *factored* path: `x` is viewed as `[..., n, k/n]` and contracted with
# `left`, the rule and `right` in turn, never forming a `k×d` array. With rank one this needs
# `r·n·(k + d) + r·n³` multiply-adds per token instead of `k·d`. Both must agree in value and
# gradient; `path="auto"` picks one from the static shapes (`phm.choose_path`).

# %%
n, k, d, r, tokens = 4, 768, 24, 1, 64
keys = jax.random.split(jax.random.PRNGKey(4), 5)
x = jax.random.normal(keys[0], (tokens, k))
rule = 0.1 * jax.random.normal(keys[1], (n, n, n))
left = jax.random.normal(keys[2], (n, k // n, r)) / np.sqrt(k // n)
right = jax.random.normal(keys[3], (n, r, d // n))
full_factors = jax.random.normal(keys[4], (n, k // n, d // n)) / np.sqrt(k // n)

for name, fac in [("low rank (LPHM)", (left, right)), ("full B (PHM)", full_factors)]:
    y_mat = phm.phm_matmul(x, rule, fac, path="materialized")
    y_fac = phm.phm_matmul(x, rule, fac, path="factored")
    np.testing.assert_allclose(y_fac, y_mat, rtol=1e-4, atol=1e-5)

    def loss(rule, fac, path):
        return jnp.sum(jnp.tanh(phm.phm_matmul(x, rule, fac, path=path)))

    g_mat = jax.grad(loss, argnums=(0, 1))(rule, fac, "materialized")
    g_fac = jax.grad(loss, argnums=(0, 1))(rule, fac, "factored")
    for a, b in zip(jax.tree_util.tree_leaves(g_fac), jax.tree_util.tree_leaves(g_mat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print(f"{name:16s} values max |diff| {float(jnp.abs(y_fac - y_mat).max()):.2e}; "
          "gradients agree")

# %%
print(f"auto takes the factored path when it needs {phm.FACTORED_ADVANTAGE:g}x fewer multiply-adds")
for n_, r_ in [(4, 1), (12, 2)]:
    print(f"x @ W for {k} → {d}, n={n_}, r={r_}:")
    for t in (1, 256, 4096):
        costs = phm.path_costs(t, k, d, n_, r_)
        print(f"  {t:5d} tokens: materialised {costs['materialized']:>11,}  "
              f"factored {costs['factored']:>11,}  -> auto: {phm.choose_path(t, k, d, n_, r_)}")

# %% [markdown]
# With Compacter's shapes (`n = 4`, `r = 1`) the factored path needs at least 5.7× fewer
# multiply-adds at every batch size, so `auto` always takes it. With `n = 12` and `r = 2` the
# per-token `r·n·(k + d) + r·n³` exceeds the `k·d` of a dense matmul: only for a few tokens,
# where building `W` dominates, is the factored path cheaper, and `auto` materialises `W`
# otherwise. Full-`B` layers
# always materialise: both paths need `k·d` multiply-adds per token there. The timings behind
# the threshold are in `benchmarks/phm_paths.py`.
