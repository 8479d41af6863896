"""PHM math against an explicit numpy reference (sum of np.kron), both compute paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compacter_jax.peft import phm

# (n, in_features k, out_features d, rank or None)
SHAPES = [(1, 6, 3, None), (2, 8, 6, None), (4, 16, 8, 1), (4, 8, 24, 2), (3, 9, 12, 3),
          (12, 24, 12, None), (4, 768 // 8, 24, 1)]


def _np_w(rule, factors):
    return sum(np.kron(rule[i], factors[i]) for i in range(rule.shape[0]))


def _params(seed, n, k, d, rank):
    rng = np.random.default_rng(seed)
    rule = rng.normal(size=(n, n, n)).astype(np.float32)
    if rank is None:
        return rule, rng.normal(size=(n, k // n, d // n)).astype(np.float32)
    left = rng.normal(size=(n, k // n, rank)).astype(np.float32)
    right = rng.normal(size=(n, rank, d // n)).astype(np.float32)
    return rule, (left, right)


def _full_np(factors):
    if isinstance(factors, tuple):
        return np.einsum("ikr,irp->ikp", *factors)
    return factors


@pytest.mark.parametrize("n,k,d,rank", SHAPES)
def test_kronecker_sum_matches_numpy_kron(n, k, d, rank):
    rule, factors = _params(0, n, k, d, rank)
    b = _full_np(factors)
    if rank is not None:
        np.testing.assert_allclose(phm.low_rank_factors(*factors), b, rtol=1e-5, atol=1e-5)
    w = phm.kronecker_sum(jnp.asarray(rule), jnp.asarray(b))
    assert w.shape == (k, d)
    np.testing.assert_allclose(w, _np_w(rule, b), rtol=1e-5, atol=1e-4)


def test_n1_is_a_dense_layer():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(1, 5, 7)).astype(np.float32)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    rule = np.full((1, 1, 1), 2.5, np.float32)
    np.testing.assert_allclose(phm.kronecker_sum(rule, b), 2.5 * b[0], rtol=1e-6)
    for path in ("materialized", "factored"):
        np.testing.assert_allclose(phm.phm_matmul(x, rule, b, path=path), x @ (2.5 * b[0]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k,d,rank", SHAPES[2:6])   # low rank (both orders) and full B
def test_paths_agree_in_value_and_gradient(n, k, d, rank):
    rule, factors = _params(2, n, k, d, rank)
    x = np.random.default_rng(3).normal(size=(2, 3, k)).astype(np.float32)
    w = _np_w(rule, _full_np(factors))
    ys = {}
    grads = {}
    for path in ("materialized", "factored"):
        ys[path] = phm.phm_matmul(x, rule, factors, path=path)
        np.testing.assert_allclose(ys[path], x @ w, rtol=1e-4, atol=1e-3 * np.abs(x @ w).max())

        def loss(x, rule, factors, path=path):
            return jnp.sum(jnp.sin(phm.phm_matmul(x, rule, factors, path=path)))
        grads[path] = jax.grad(loss, argnums=(0, 1, 2))(x, rule, factors)
    for ga, gb in zip(jax.tree_util.tree_leaves(grads["materialized"]),
                      jax.tree_util.tree_leaves(grads["factored"])):
        np.testing.assert_allclose(ga, gb, rtol=2e-4, atol=2e-4 * float(np.abs(ga).max()))


def test_rule_gradient_matches_numpy():
    """d/dA sum(y * g) for y = x @ sum_i A_i ⊗ B_i, against an explicit numpy formula."""
    n, k, d = 2, 4, 6
    rule, b = _params(4, n, k, d, None)
    rng = np.random.default_rng(5)
    x, g = rng.normal(size=(3, k)).astype(np.float32), rng.normal(size=(3, d)).astype(np.float32)
    grad = jax.grad(lambda a: jnp.sum(phm.phm_matmul(x, a, b, path="factored") * g))(rule)
    dw = x.T @ g                                     # dL/dW, [k, d]
    kk, pp = k // n, d // n
    expected = np.einsum("aqcp,iqp->iac", dw.reshape(n, kk, n, pp), b)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)


def test_auto_path_choice():
    # Compacter's projections save > 4x multiply-adds factored; full B never does.
    assert phm.choose_path(4096, 768, 24, 4, 1) == "factored"
    assert phm.choose_path(4096, 24, 768, 4, 1) == "factored"
    assert phm.choose_path(4096, 768, 24, 12, None) == "materialized"
    assert phm.choose_path(4096, 768, 24, 12, 1) == "materialized"   # only 1.7x fewer
    rule, factors = _params(6, 4, 16, 8, 1)
    x = np.ones((5, 16), np.float32)
    np.testing.assert_allclose(phm.phm_matmul(x, rule, factors),
                               phm.phm_matmul_materialized(x, rule, factors), rtol=1e-5)


def test_divisibility_errors_name_the_field_and_fix():
    with pytest.raises(ValueError, match=r"in_features=10 is not divisible by n=4.*divides"):
        phm.check_phm_dims(10, 8, 4)
    with pytest.raises(ValueError, match=r"out_features=6 is not divisible by n=4"):
        phm.check_phm_dims(8, 6, 4)
    with pytest.raises(ValueError, match=r"rank=3 .*\[1, 2\].*lower `rank`"):
        phm.check_phm_dims(8, 16, 4, rank=3)
    phm.check_phm_dims(8, 16, 4, rank=2)


def test_shape_errors():
    rule, b = _params(7, 2, 4, 6, None)
    with pytest.raises(ValueError, match=r"rule must have shape \[n, n, n\]"):
        phm.kronecker_sum(rule[:, :, :1], b)
    with pytest.raises(ValueError, match=r"factors must have shape \[n=2"):
        phm.kronecker_sum(rule, b[:1])
    with pytest.raises(ValueError, match="input has 5 features"):
        phm.phm_matmul(np.ones((1, 5), np.float32), rule, b, path="factored")
    with pytest.raises(ValueError, match="path must be"):
        phm.phm_matmul(np.ones((1, 4), np.float32), rule, b, path="fast")
