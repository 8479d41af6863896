"""Loading a checkpoint with a method: the backbone unchanged, only the method's parameters
initialised, `prepare` applied (prompt tuning's vocabulary init)."""

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models import T5ForConditionalGeneration, get_preset, save_pretrained
from compacter_jax.peft import from_pretrained, get_method, init_prompt_from_vocab

TINY = get_preset("t5-tiny").replace(vocab_size=64)
FIT = dict(reduction_factor=8)


def test_from_pretrained_with_a_method(tmp_path):
    backbone = T5ForConditionalGeneration(TINY)
    x = jnp.ones((1, 3), jnp.int32)
    base = backbone.init(jax.random.PRNGKey(4), x, x, x)["params"]
    save_pretrained(tmp_path / "ckpt", TINY, base)
    model, params = from_pretrained(str(tmp_path / "ckpt"), "compacter++", **FIT)
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, value in traverse_util.flatten_dict(base, sep="/").items():
        np.testing.assert_array_equal(flat[path], value)        # backbone unchanged
    assert "peft_root/phm_rule" in flat and "encoder/block_0/layer_1/adapter/up/bias" in flat
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 5), 1, 64)
    logits = jax.jit(model.apply)({"params": params}, ids, jnp.ones_like(ids), ids)
    assert logits.shape == (2, 5, 64) and bool(jnp.all(jnp.isfinite(logits)))

    _, params = from_pretrained(str(tmp_path / "ckpt"), "prompt_tuning", length=3,
                                init="vocab", vocab_ids=(5, 6, 9))
    np.testing.assert_array_equal(params["encoder"]["prompt"]["embedding"],
                                  base["shared"]["embedding"][np.array([5, 6, 9])])
    again = init_prompt_from_vocab(params)                      # default ids 0..length-1
    np.testing.assert_array_equal(again["encoder"]["prompt"]["embedding"],
                                  base["shared"]["embedding"][:3])
    _, params = from_pretrained(str(tmp_path / "ckpt"), get_method("prompt_tuning_vocab",
                                                                   length=4))
    np.testing.assert_array_equal(params["encoder"]["prompt"]["embedding"],
                                  base["shared"]["embedding"][:4])
    _, plain = from_pretrained(str(tmp_path / "ckpt"))          # no method: the backbone
    assert traverse_util.flatten_dict(plain).keys() == traverse_util.flatten_dict(base).keys()
