"""BitFit as the original: a bias on every projection, every block layer norm and the lm_head;
the projection-only variant; the biases act as biases."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tiny import TINY, ids, init_fn, shapes

from compacter_jax.models import T5ForConditionalGeneration
from compacter_jax.peft import build_model, get_method


def test_bias_placement():
    for name, norms in (("bitfit", True), ("bitfit_projections", False)):
        flat = shapes(TINY, get_method(name))
        biases = {p: v.shape for p, v in flat.items() if "_delta/" in p}
        kernels = {p.replace("/kernel", "_delta/bias"): v.shape[1:] for p, v in flat.items()
                   if p.endswith("/kernel")}      # every projection (T5-tiny: tied lm_head)
        ln = {p.replace("layer_norm/scale", "layer_norm_delta/bias"): v.shape
              for p, v in flat.items() if p.endswith("/layer_norm/scale")} if norms else {}
        assert len(ln) == (2 * 2 + 2 * 3 if norms else 0)   # block norms, not the final two
        assert biases == {**kernels, **ln, "lm_head_delta/bias": (TINY.vocab_size,)}


def test_layer_norm_bias_is_added_to_the_norm_output():
    """With every bias zero except one layer norm's, the output equals the plain T5 whose
    norm output is shifted: checked through the projections that read it (q = (y + b) Wq)."""
    model = build_model(TINY, get_method("bitfit"))
    params = init_fn(model)(jax.random.PRNGKey(0))
    flat = traverse_util.flatten_dict(params, sep="/")
    b = jax.random.normal(jax.random.PRNGKey(1), (TINY.d_model,)) * 0.5
    key = "encoder/block_0/layer_1/layer_norm_delta/bias"
    flat[key] = b
    x, dec = ids(), ids(seed=1)
    out = model.apply({"params": traverse_util.unflatten_dict(flat, sep="/")}, x,
                      jnp.ones_like(x), dec)
    # Reference: the plain backbone with b folded into wi's input, i.e. a bias b @ W_wi on wi.
    plain = {p: v for p, v in flat.items() if "_delta" not in p}
    wi = plain["encoder/block_0/layer_1/DenseReluDense/wi/kernel"]
    ref_model = build_model(TINY, get_method("bitfit_projections"))
    ref_flat = {p: jnp.zeros_like(v) if "_delta" in p else v
                for p, v in traverse_util.flatten_dict(init_fn(ref_model)(
                    jax.random.PRNGKey(0)), sep="/").items()}
    ref_flat.update(plain)
    ref_flat["encoder/block_0/layer_1/DenseReluDense/wi_delta/bias"] = b @ wi
    ref = ref_model.apply({"params": traverse_util.unflatten_dict(ref_flat, sep="/")}, x,
                          jnp.ones_like(x), dec)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    base = T5ForConditionalGeneration(TINY).apply(
        {"params": traverse_util.unflatten_dict(plain, sep="/")}, x, jnp.ones_like(x), dec)
    assert float(jnp.abs(out - base).max()) > 1e-3        # the bias did something
