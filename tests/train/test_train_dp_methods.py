"""The DP step for every PEFT method (it only sees the method's `combine`): on a tiny T5 with
noise 0, clip inf and equal target lengths its gradient is the plain step's, and its gradient
tree is exactly the method's trainable tree. Long tests (COMPACTER_LONG_TESTS=1)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compacter_jax import peft
from compacter_jax.models import T5Config, T5ForConditionalGeneration, init_params, save_pretrained
from compacter_jax.train import TrainState, make_train_step, seq2seq_apply_fn
from compacter_jax.train.dp import make_dp_train_step

TINY = T5Config(vocab_size=64, d_model=48, d_kv=16, d_ff=64, num_layers=2,
                num_decoder_layers=2, num_heads=2)
OVERRIDES = {"adapter": {"reduction_factor": 4}, "pfeiffer": {"reduction_factor": 4},
             "adapterdrop": {"reduction_factor": 4, "drop_first": 1},
             "lowrank": {"reduction_factor": 4}, "phm_adapter": {"reduction_factor": 4},
             "compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4},
             "prompt_tuning": {"length": 4}, "prompt_tuning_vocab": {"length": 4},
             "intrinsic_said": {"dim": 500}}
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "t5"
    save_pretrained(path, TINY, init_params(T5ForConditionalGeneration(TINY),
                                            jax.random.PRNGKey(0)))
    return str(path)


def capture_grads():
    return optax.GradientTransformation(
        lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree_util.tree_map(jnp.zeros_like, g), g))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.long  # a T5 compile or two each; fast versions: tests/train/test_train_dp.py (toy) and
@pytest.mark.parametrize("name", peft.method_names())  # test_dp_finetune.py (Compacter++)
def test_dp_step_of_every_method_is_the_plain_step_at_noise_0_clip_inf(name, backbone):
    model, params = peft.from_pretrained(backbone, name, rng=jax.random.PRNGKey(1),
                                         **OVERRIDES.get(name, {}))
    method = peft.get_method(name, **OVERRIDES.get(name, {}))
    trainable, frozen = method.partition(params)
    rs = np.random.RandomState(0)
    labels = rs.randint(2, 64, (4, 3)).astype(np.int32)
    batch = {"input_ids": rs.randint(2, 64, (4, 10)).astype(np.int32),
             "attention_mask": (np.arange(10)[None] < rs.randint(3, 11, (4, 1))).astype(np.int32),
             "labels": labels, "decoder_input_ids": np.asarray(
                 np.concatenate([np.zeros((4, 1), np.int32), labels[:, :-1]], 1)),
             "decoder_attention_mask": np.ones((4, 3), np.int32)}  # equal target lengths
    tx, apply_fn = capture_grads(), seq2seq_apply_fn(model)
    state = TrainState.create(trainable, tx, 2)
    plain = jax.jit(make_train_step(apply_fn, tx, merge_fn=method.combine,
                                    per_example_dropout=True))
    dp = jax.jit(make_dp_train_step(apply_fn, tx, merge_fn=method.combine, clip_norm=np.inf,
                                    noise_multiplier=0.0, expected_batch_size=4))
    g_plain = plain(state, frozen, batch)[0].opt_state
    g_dp = dp(state, frozen, batch)[0].opt_state
    structure = jax.tree_util.tree_structure
    assert structure(g_dp) == structure(trainable)  # the trainable tree, nothing frozen
    a, b = flat(g_dp), flat(g_plain)
    assert np.linalg.norm(b) > 0
    # Sum of 4 per-example gradients vs one batched gradient: float32 reassociation only.
    assert np.linalg.norm(a - b) <= 64 * EPS32 * np.linalg.norm(b), (
        np.linalg.norm(a - b) / np.linalg.norm(b))
