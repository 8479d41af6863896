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
