"""Labels by path, the trainable/frozen split in a train step, the optimizer safety net, and a
jaxpr check that the library's train step computes no gradient for frozen weights."""

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex_core

from compacter_jax.models import get_preset
from compacter_jax.peft import (FROZEN, TRAINABLE, PathRule, build_model, count,
                                freezing_optimizer, get_method, label_params, merge, path_rule,
                                split, trainable_count)
from compacter_jax.train import TrainState, make_train_step, seq2seq_apply_fn

# Untied lm_head so the test can check that it stays frozen.
TINY = get_preset("t5-tiny").replace(vocab_size=64, tie_word_embeddings=False,
                                     scale_decoder_outputs=False)
METHOD = get_method("compacter", reduction_factor=8)
B, S, T = 2, 6, 4


def _batch(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    ids = jax.random.randint(k1, (B, S), 1, TINY.vocab_size)
    labels = jax.random.randint(k2, (B, T), 1, TINY.vocab_size)
    dec = jnp.concatenate([jnp.zeros((B, 1), jnp.int32), labels[:, :-1]], axis=1)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": labels,
            "decoder_input_ids": dec, "decoder_attention_mask": jnp.ones_like(labels)}


@pytest.fixture(scope="module")
def setup():
    model = build_model(TINY, METHOD)
    b = _batch()
    shapes = jax.eval_shape(lambda r: model.init(r, b["input_ids"], b["attention_mask"],
                                                 b["decoder_input_ids"])["params"],
                            jax.random.PRNGKey(0))
    # Random values from numpy (no init compilation); non-zero everywhere so that every
    # gradient path is exercised; layer-norm scales near 1.
    rng = np.random.default_rng(0)
    params = traverse_util.unflatten_dict({
        p: jnp.asarray((p[-1] == "scale") + rng.normal(0, 0.1, s.shape), jnp.float32)
        for p, s in traverse_util.flatten_dict(shapes).items()})
    return model, params, label_params(params, METHOD)


def _loss_fn(model):
    def loss(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                             batch["decoder_input_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def test_labels_by_path(setup):
    _, params, labels = setup
    flat = _flat(labels)
    trainable = {p for p, v in flat.items() if v == TRAINABLE}
    for p in trainable:
        assert ("/adapter/" in p or p.startswith("peft_root/") or p.endswith("layer_norm/scale"))
    norms = [p for p in flat if p.endswith("layer_norm/scale")]
    assert len(norms) == 2 * 2 + 1 + 2 * 3 + 1 and set(norms) <= trainable
    assert {"encoder/final_layer_norm/scale", "decoder/final_layer_norm/scale"} <= trainable
    assert flat["lm_head/kernel"] == FROZEN and flat["shared/embedding"] == FROZEN
    assert flat["peft_root/phm_rule"] == TRAINABLE
    assert all(flat[p] == FROZEN for p in flat if p.endswith("/kernel") and "adapter" not in p)
    n_ln = 12 * 64
    n_adapters = sum(int(np.prod(v.shape)) for p, v in _flat(params).items()
                     if "adapter" in p or "peft_root" in p)
    assert trainable_count(params, labels) == trainable_count(params, METHOD) == n_ln + n_adapters
    # Other methods.
    full = _flat(label_params(params, get_method("full")))
    assert set(full.values()) == {TRAINABLE}
    no_ln = _flat(label_params(params, METHOD.replace(train_layer_norms=False)))
    assert _flat(label_params(params, lambda path: path[0] == "lm_head")) == {
        p: TRAINABLE if p.startswith("lm_head/") else FROZEN for p in flat}
    assert all(no_ln[p] == FROZEN for p in norms)
    shapes = {"encoder": {"prompt": {"embedding": jax.ShapeDtypeStruct((3, 8), jnp.float32)},
                          "final_layer_norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)}},
              "decoder": {"block_0": {"layer_0": {"SelfAttention": {
                  "q": {"kernel": jax.ShapeDtypeStruct((8, 8), jnp.float32)},
                  "q_delta": {"bias": jax.ShapeDtypeStruct((8,), jnp.float32)}}}}}}
    # Labels follow the paths: whatever PEFT module a tree holds is trainable, LNs only if asked.
    for method in ("prompt_tuning", "bitfit_projections", "lora"):
        flat = _flat(label_params(shapes, get_method(method).is_trainable))  # a part of a T5
        assert sorted(p for p, v in flat.items() if v == TRAINABLE) == [
            "decoder/block_0/layer_0/SelfAttention/q_delta/bias", "encoder/prompt/embedding"]
    assert count(shapes) == 24 + 8 + 64 + 8


def test_train_step_updates_only_trainable_and_state_is_trainable_only(setup):
    model, params, labels = setup
    trainable, frozen = split(params, labels)
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    opt_state = tx.init(trainable)
    loss = _loss_fn(model)

    @jax.jit
    def step(trainable, frozen, opt_state, batch):
        value, grads = jax.value_and_grad(lambda t: loss(merge(t, frozen), batch))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return merge(trainable, frozen), opt_state, value

    losses = []
    start = trainable
    for i in range(3):
        new_params, opt_state, value = step(trainable, frozen, opt_state, _batch(i))
        trainable, frozen = split(new_params, labels)
        losses.append(float(value))
    assert np.all(np.isfinite(losses))
    for path, value in _flat(frozen).items():         # frozen leaves: bit-identical
        np.testing.assert_array_equal(np.asarray(value), _flat(frozen_before)[path])
    moved = [p for p, v in _flat(trainable).items()
             if not np.array_equal(np.asarray(v), np.asarray(_flat(start)[p]))]
    assert len(moved) == len(_flat(start))           # every trainable leaf moved
    # Optimizer state: moments shaped exactly like the trainable tree, nothing else.
    adam = opt_state[0]
    assert jax.tree_util.tree_structure(adam.mu) == jax.tree_util.tree_structure(start)
    state_size = count(opt_state)
    assert state_size == 2 * count(start) + 1        # mu, nu + the step count


def test_safety_net_optimizer_freezes_the_full_tree(setup):
    model, params, labels = setup
    loss = _loss_fn(model)
    grads = jax.jit(jax.grad(loss))(params, _batch())
    frozen_flat = {p for p, v in _flat(labels).items() if v == FROZEN}
    # A plain optimizer on the whole tree moves frozen weights (weight decay and gradients) ...
    naive = optax.adamw(1e-2, weight_decay=0.1)
    upd, _ = jax.jit(naive.update)(grads, naive.init(params), params)
    assert any(np.any(np.asarray(_flat(upd)[p]) != 0) for p in frozen_flat)
    # ... the multi_transform net does not, and keeps no state for frozen leaves.
    tx = freezing_optimizer(METHOD, naive)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(2):
        upd, state = update(grads, state, params)
        new = optax.apply_updates(params, upd)
    for p in frozen_flat:
        np.testing.assert_array_equal(np.asarray(_flat(new)[p]), np.asarray(_flat(params)[p]))
    assert any(not np.array_equal(_flat(new)[p], _flat(params)[p])
               for p in _flat(labels) if p not in frozen_flat)
    assert count(state) == 2 * trainable_count(params, labels) + 1
    assert count(freezing_optimizer(labels, naive).init(params)) == count(state)


def _count_primitive(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a jaxpr, including nested (pjit, remat, ...) ones."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    n += _count_primitive(sub.jaxpr, name)
                elif isinstance(sub, jex_core.Jaxpr):
                    n += _count_primitive(sub, name)
    return n


def test_no_gradient_is_computed_for_frozen_weights(setup):
    """The library's train step differentiates only the trainable tree: its jaxpr has no
    weight-gradient matmuls (x^T @ dy) for frozen kernels. The same step with everything
    trainable (full fine-tuning) is the contrast: at least one more dot_general per frozen
    kernel, which this check detects."""
    model, params, labels = setup
    trainable, frozen = split(params, labels)
    batch = _batch()
    tx = optax.sgd(1e-3)
    apply_fn = seq2seq_apply_fn(model)

    def dots(trainable, frozen):
        step = make_train_step(apply_fn, tx, merge_fn=merge)
        state = TrainState.create(trainable, tx, 0)
        return _count_primitive(jax.make_jaxpr(step)(state, frozen, batch).jaxpr, "dot_general")

    forward = _count_primitive(jax.make_jaxpr(lambda p: apply_fn(p, batch, True, None))(
        params).jaxpr, "dot_general")
    good = dots(trainable, frozen)
    bad = dots(*split(params, label_params(params, get_method("full"))))
    # Each frozen kernel (q, k, v, o, wi, wo, lm_head) is used in one matmul; its weight
    # gradient would be one more dot_general. Embedding tables are gathers (no dot).
    frozen_kernels = sum(1 for p in _flat(frozen) if p.endswith("kernel"))
    assert frozen_kernels == 2 * 6 + 2 * 10 + 1
    print(f"dot_general: forward {forward}, grad(trainable) {good}, grad(all) {bad}, "
          f"frozen kernels {frozen_kernels}")
    assert bad - good >= frozen_kernels
    assert good > forward      # it does differentiate (through frozen layers to adapters)


# -- a split that never guesses (issue 20) ------------------------------------------------------

def _gpt_like():
    """A parameter tree that is not a T5 (a small decoder-only LM with LoRA-like extras)."""
    rng = np.random.default_rng(0)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return {"wte": {"embedding": w(16, 8)},
            "h_0": {"attn": {"c_attn": {"kernel": w(8, 24)}, "lora_a": {"kernel": w(8, 2)}},
                    "ln_1": {"scale": w(8)}},
            "ln_f": {"scale": w(8)}}


@pytest.mark.parametrize("name", ["compacter++", "lora", "prompt_tuning", "intrinsic_said"])
def test_a_method_refuses_a_tree_that_is_not_its_t5(name):
    """Before: every weight of a non-T5 tree read as "inserted by the method", so Compacter++
    trained all of it. Now: an error naming the T5 weights that are missing."""
    method = get_method(name)
    for call in (method.partition, method.trainable_count, lambda p: label_params(p, method),
                 lambda p: split(p, method), lambda p: freezing_optimizer(method, optax.sgd(1)).init(p)):
        with pytest.raises(ValueError, match=r"lacks the T5 weights shared/embedding, "
                                             r"encoder/relative_attention_bias/embedding.*"
                                             r"\['h_0', 'ln_f', 'wte'\].*explicit rule"):
            call(_gpt_like())
    # A T5 tree cut down to a few leaves is refused too (what is missing is named).
    part = {"shared": {"embedding": jnp.zeros((4, 2))},
            "encoder": {"final_layer_norm": {"scale": jnp.ones(2)}}}
    with pytest.raises(ValueError, match="decoder/final_layer_norm/scale"):
        method.partition(part)


def test_explicit_path_rules_split_any_model():
    params = _gpt_like()
    lora_and_norms = ["h_0/attn/lora_a/kernel", "h_0/ln_1/scale", "ln_f/scale"]
    by_regex = split(params, r"lora_|ln_")
    by_compiled = split(params, __import__("re").compile(r"lora_|ln_"))
    by_predicate = split(params, lambda path: path[-2].startswith(("lora_", "ln_")))
    for trainable, frozen in (by_regex, by_compiled, by_predicate):
        assert sorted(_flat(trainable)) == lora_and_norms
        assert sorted(_flat(frozen)) == ["h_0/attn/c_attn/kernel", "wte/embedding"]
    assert trainable_count(params, r"lora_|ln_") == 16 + 8 + 8
    # The optimizer safety net with a rule: frozen leaves never move, trainable ones do.
    tx = freezing_optimizer(r"lora_|ln_", optax.adamw(1e-1, weight_decay=0.1))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    upd, _ = tx.update(grads, tx.init(params), params)
    moved = {p for p, v in _flat(upd).items() if np.any(np.asarray(v) != 0)}
    assert moved == set(lora_and_norms)
    tx = freezing_optimizer(path_rule(lambda path: "lora_a" in path), optax.sgd(1.0))
    assert {p for p, v in _flat(tx.update(grads, tx.init(params), params)[0]).items()
            if np.any(np.asarray(v) != 0)} == {"h_0/attn/lora_a/kernel"}
    # A rule that matches nothing, a bad regex, an ambiguous rule: errors that say so.
    with pytest.raises(ValueError, match=r"'adapter' matches none of the 5 parameters.*wte/"):
        split(params, "adapter")
    with pytest.raises(ValueError, match="not a valid regex"):
        split(params, "lora_(")
    with pytest.raises(ValueError, match="exactly one of"):
        PathRule(pattern="a", predicate=lambda p: True)
    with pytest.raises(TypeError, match="a path rule is a regex or a predicate"):
        split(params, 3)
    # A T5 may be split by rule as well (no check: the rule is explicit).
    t5 = {"shared": {"embedding": jnp.zeros((4, 2))},
          "encoder": {"prompt": {"embedding": jnp.ones((3, 2))}}}
    assert list(_flat(split(t5, "prompt")[0])) == ["encoder/prompt/embedding"]
