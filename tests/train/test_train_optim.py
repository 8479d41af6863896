"""Optimizer: schedule shape (HF linear warm-up/decay), clipping, and AdamW vs a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compacter_jax.train.optim import make_optimizer, make_schedule


def hf_linear(step, lr, warmup, total):
    """transformers.get_linear_schedule_with_warmup, written out."""
    if step < warmup:
        return lr * step / max(1, warmup)
    return lr * max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize("warmup", [0, 3, 10, 25])  # 10, 25: warm-up >= total, ramp only
def test_schedule_matches_hf_formula(warmup):
    sched = make_schedule(0.1, warmup, 10)
    for s in range(0, 13):
        np.testing.assert_allclose(float(sched(s)), hf_linear(s, 0.1, warmup, 10),
                                   rtol=1e-6, atol=1e-9)


def test_schedule_rejects_bad_args():
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule(0.1, 10, 0)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule(0.1, -1, 10)
    with pytest.raises(ValueError, match="learning_rate"):
        make_schedule(0.0, 0, 10)


def numpy_adamw(params, grads_seq, lr_fn, clip, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    """Reference: clip by global norm, then AdamW with bias correction and decoupled decay."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq):
        norm = np.sqrt(sum(np.sum(x.astype(np.float64) ** 2) for x in g.values()))
        scale = min(1.0, clip / norm)
        lr = lr_fn(t)
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk ** 2
            mh, vh = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
            p[k] = p[k] - lr * (mh / (np.sqrt(vh) + eps) + wd * p[k])
    return p


def test_optimizer_matches_numpy_adamw_with_clipping():
    rng = np.random.default_rng(0)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32),
              "b": rng.normal(size=(5,)).astype(np.float32)}
    # large gradients so that clipping to 1.0 is active
    grads_seq = [{k: (10 * rng.normal(size=v.shape)).astype(np.float32) for k, v in params.items()}
                 for _ in range(5)]
    tx, sched = make_optimizer(0.05, 2, 8, weight_decay=0.01, clip_norm=1.0)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads_seq:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    ref = numpy_adamw(params, grads_seq, lambda t: hf_linear(t, 0.05, 2, 8), clip=1.0)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)
    # without clipping the result differs (clipping really happened)
    tx2, _ = make_optimizer(0.05, 2, 8, weight_decay=0.01, clip_norm=None)
    p2 = jax.tree_util.tree_map(jnp.asarray, params)
    s2 = tx2.init(p2)
    for g in grads_seq:
        u, s2 = tx2.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
    assert not np.allclose(np.asarray(p2["a"]), ref["a"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- transformers' AdamW ("hf_adamw")

EPS32 = float(np.finfo(np.float32).eps)


def numpy_hf_adamw(params, grads_seq, lr_fn, clip=None, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Reference, in float64: torch's clip_grad_norm_ then transformers' AdamW (4.x), step by
    step as its `step()`: eps on the uncorrected sqrt(v), bias correction in the step size,
    weight decay on the parameter just updated. Update t (1-based) uses lr_fn(t - 1)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, start=1):
        g = {k: x.astype(np.float64) for k, x in g.items()}
        if clip is not None:
            coef = clip / (np.sqrt(sum(np.sum(x ** 2) for x in g.values())) + 1e-6)
            if coef < 1:
                g = {k: x * coef for k, x in g.items()}
        lr = lr_fn(t - 1)
        step_size = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            p[k] = p[k] - step_size * m[k] / (np.sqrt(v[k]) + eps)
            p[k] = p[k] - lr * wd * p[k]
    return p


def run_tx(tx, params, grads_seq):
    p = jax.tree_util.tree_map(jnp.asarray, params)
    state = tx.init(p)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for g in grads_seq:
        p, state = step(p, state, g)
    return {k: np.asarray(x, np.float64) for k, x in p.items()}


def small_gradients(steps, seed=0):
    """Compacter-like magnitudes: a 1e-4-scale rule, unit-scale weights, gradients 1e-6..1e-4
    (each leaf its own scale, a persistent mean so the moments do not average to zero)."""
    rng = np.random.default_rng(seed)
    params = {"rule": (1e-4 * rng.normal(size=(4, 2, 2))).astype(np.float32),
              "down": rng.normal(size=(6, 3)).astype(np.float32),
              "bias": rng.normal(size=(7,)).astype(np.float32)}
    scales = {"rule": 1e-6, "down": 1e-5, "bias": 1e-4}
    drift = {k: rng.normal(size=v.shape) for k, v in params.items()}
    grads_seq = [{k: (scales[k] * (drift[k] + rng.normal(size=v.shape))).astype(np.float32)
                  for k, v in params.items()} for _ in range(steps)]
    return params, grads_seq


def rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_hf_adamw_matches_numpy_transformers_formula(weight_decay):
    """100 updates of the paper's schedule shape (Compacter's 3e-3, warm-up 10) on 1e-6..1e-4
    gradients: the library's "hf_adamw" equals the float64 numpy formula to <= 1e-6 (relative
    L2 per leaf), and differs from optax.adamw by 20x (|g| = 1e-4) to 10^4x (|g| = 1e-6) more.

    Tolerance: float32 storage rounds each parameter once per update (<= eps32/2 relative,
    unbiased), so after T = 100 updates the relative L2 error is ~ sqrt(T/12) * eps32 = 3.4e-7;
    the update itself is a handful of float32 ops on a term <= lr. 1e-6 leaves ~3x margin.
    Elementwise the worst case (every rounding the same way) is T * eps32 * max|p|.
    """
    steps, lr, warmup = 100, 3e-3, 10
    params, grads_seq = small_gradients(steps)
    tx, _ = make_optimizer(lr, warmup, steps, weight_decay=weight_decay, clip_norm=1.0,
                           optimizer="hf_adamw")
    got = run_tx(tx, params, grads_seq)
    ref = numpy_hf_adamw(params, grads_seq, lambda t: hf_linear(t, lr, warmup, steps),
                         clip=1.0, wd=weight_decay)
    textbook, _ = make_optimizer(lr, warmup, steps, weight_decay=weight_decay, clip_norm=1.0,
                                 optimizer="adamw")
    other = run_tx(textbook, params, grads_seq)
    for k in params:
        assert rel_l2(got[k], ref[k]) <= 1e-6, (k, rel_l2(got[k], ref[k]))
        np.testing.assert_allclose(got[k], ref[k], rtol=0,
                                   atol=steps * EPS32 * np.abs(ref[k]).max())
        # eps on sqrt(v) vs on sqrt(v_hat): the relative change of an update is ~ eps / |g|,
        # 1e-2 at |g| = 1e-6 down to 1e-4 at 1e-4; the parameters (moved ~ sum(lr) = 0.16)
        # differ by 3e-2 (rule) ... 5e-5 (bias): at least 20x the tolerance above.
        assert rel_l2(other[k], ref[k]) > 2e-5, (k, rel_l2(other[k], ref[k]))
    assert rel_l2(other["rule"], ref["rule"]) > 1e-2  # the 1e-6 gradients: a 1% difference


def test_hf_adamw_clips_as_torch_and_decays_after_the_step():
    """Large gradients (clipping active every step), weight decay 0.1: still the formula."""
    rng = np.random.default_rng(1)
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32),
              "b": rng.normal(size=(5,)).astype(np.float32)}
    grads_seq = [{k: (10 * rng.normal(size=v.shape)).astype(np.float32)
                  for k, v in params.items()} for _ in range(20)]
    tx, _ = make_optimizer(0.05, 3, 20, weight_decay=0.1, clip_norm=1.0, optimizer="hf_adamw")
    got = run_tx(tx, params, grads_seq)
    ref = numpy_hf_adamw(params, grads_seq, lambda t: hf_linear(t, 0.05, 3, 20), clip=1.0,
                         wd=0.1)
    unclipped = numpy_hf_adamw(params, grads_seq, lambda t: hf_linear(t, 0.05, 3, 20),
                               clip=None, wd=0.1)
    for k in params:
        assert rel_l2(got[k], ref[k]) <= 20 * EPS32, (k, rel_l2(got[k], ref[k]))
        assert rel_l2(unclipped[k], ref[k]) > 1e-4  # the clipping mattered


def test_make_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="hf_adamw"):
        make_optimizer(1e-3, 0, 10, optimizer="adam_hf")
