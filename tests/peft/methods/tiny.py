"""Tiny T5 configs and shape helpers shared by the method-family tests (`init_fn` is the
library's, re-exported for them)."""

import flax.traverse_util as traverse_util
import jax

from compacter_jax.models import get_preset, init_fn, param_shapes
from compacter_jax.peft import build_model

TINY = get_preset("t5-tiny").replace(vocab_size=64)              # d_model 64, 2 + 2 blocks
# 12 + 12 blocks (AdapterDrop's "blocks 5-11"), only ever traced with eval_shape.
TINY12 = TINY.replace(d_model=32, d_ff=32, d_kv=8, num_layers=12, num_decoder_layers=12)
FIT = dict(reduction_factor=8)                                   # bottleneck 8 (n = 4 divides)
__all__ = ["FIT", "TINY", "TINY12", "ids", "init_fn", "shapes"]


def ids(b=2, t=5, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 1, TINY.vocab_size)


def shapes(t5, method):
    """{"a/b/c": ShapeDtypeStruct} of T5 + method (no weights allocated)."""
    return traverse_util.flatten_dict(param_shapes(build_model(t5, method)), sep="/")
