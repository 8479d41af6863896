"""Intrinsic-SAID and its Fastfood projection (`peft/fastfood.py`) against explicit references.

References: scipy's dense Hadamard matrix, a dense float64 Fastfood matrix built here from the
same constants, the original's torch formula (re-implemented here, with its autograd backward),
and the parameter names/order of Hugging Face's PyTorch T5.
"""

import functools

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from compacter_jax.models import T5ForConditionalGeneration, get_preset, stack_blocks
from compacter_jax import peft
from compacter_jax.peft import fastfood as ff
from compacter_jax.peft.methods import intrinsic as said_lib

# float32 transforms against float64 references, relative to the reference's largest entry.
RTOL32 = 2e-6

# Jitted once per shape: eager op-by-op dispatch compiles every primitive separately.
project = jax.jit(ff.fastfood_project, static_argnames="original_gradient_scale")
params_fn = jax.jit(said_lib.intrinsic_params,
                    static_argnames=("original_gradient_scale", "max_chunk_elements"))


def _close(actual, expected, rtol=RTOL32):
    expected = np.asarray(expected, np.float64)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=0,
                               atol=rtol * max(1.0, np.abs(expected).max()))


def _row(constants, row):
    """One tensor's constants out of a stacked group."""
    return jax.tree_util.tree_map(lambda a: a[row], constants)


def _dense_fastfood(c, d):
    """float64 [D, d] matrix of P: (H G Pi H B)[:D, :d] / (divisor sqrt(D / L)); d > L: [:, :L]."""
    length, size = c.length, c.out_size
    h = scipy.linalg.hadamard(length).astype(np.float64)
    perm = np.zeros((length, length))
    perm[np.arange(length), np.asarray(c.permutation)] = 1.0  # (Pi x)[j] = x[Pi[j]]
    m = h @ np.diag(np.asarray(c.gaussian, np.float64)) @ perm @ h @ np.diag(
        np.asarray(c.signs, np.float64))
    m = m[:size] / (float(c.divisor) * np.sqrt(size / length))
    out = np.zeros((size, d))
    out[:, :min(d, length)] = m[:, :min(d, length)]
    return out


# ----------------------------------------------------------------------------- fwht


@pytest.mark.parametrize("length", [1, 2, 4, 32, 256, 2048])
def test_fwht_matches_dense_hadamard(length):
    x = np.random.default_rng(length).normal(size=(2, 3, length)).astype(np.float32)
    _close(ff.fwht(jnp.asarray(x)), x.astype(np.float64) @ scipy.linalg.hadamard(length))


@pytest.mark.parametrize("block_bits", [1, 2, 5])
def test_fwht_every_block_size_is_the_same_transform(block_bits):
    x = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    _close(ff._fwht(jnp.asarray(x), block_bits), x.astype(np.float64) @ scipy.linalg.hadamard(512))


@pytest.mark.parametrize("count", [1, 17, 129, 200, 256])
def test_fwht_head_is_the_first_outputs(count):
    x = np.random.default_rng(count).normal(size=(2, 256)).astype(np.float32)
    head = jax.jit(ff._fwht_head, static_argnums=1)(jnp.asarray(x), count)
    assert head.shape == (2, count)
    _close(head, (x.astype(np.float64) @ scipy.linalg.hadamard(256))[:, :count])


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        ff.fwht(jnp.ones((3, 12)))


def test_fwht_gradient_true_and_original_scale():
    length = 64
    x = jnp.asarray(np.random.default_rng(1).normal(size=length), jnp.float32)
    w = np.random.default_rng(2).normal(size=length)
    true = scipy.linalg.hadamard(length) @ w  # d/dx <w, x H> = H w (H symmetric)
    _close(jax.grad(lambda v: jnp.vdot(w, ff.fwht(v)))(x), true)
    original = jax.grad(lambda v: jnp.vdot(w, ff.fwht(v, original_gradient_scale=True)))(x)
    _close(original, true / np.sqrt(length))
    _close(ff.fwht(x, original_gradient_scale=True), ff.fwht(x))  # forward unchanged


# ----------------------------------------------------------------------------- Fastfood


def test_fastfood_length_is_the_originals_formula():
    assert [ff.fastfood_length(d) for d in (1, 2, 3, 768, 1024, 1025, 589824, 24674304)] == [
        1, 2, 4, 1024, 1024, 2048, 2**20, 2**25]
    # np.log(2**29) / np.log(2) rounds above 29 in the original's formula.
    assert ff.fastfood_length(2**29) == 2**30
    with pytest.raises(ValueError, match="out_size"):
        ff.fastfood_length(0)


def test_make_fastfood_constants():
    c = ff.make_fastfood(jax.random.key(3), 100)
    assert c.length == 128 and c.out_size == 100
    assert (c.signs.dtype, c.permutation.dtype, c.gaussian.dtype) == (jnp.int8, jnp.int32,
                                                                      jnp.float32)
    assert set(np.unique(np.asarray(c.signs))) == {-1, 1}
    assert sorted(np.asarray(c.permutation).tolist()) == list(range(128))
    g = np.asarray(c.gaussian, np.float64)
    np.testing.assert_allclose(float(c.divisor), np.sqrt(128 * np.sum(g**2)), rtol=1e-6)
    again = ff.make_fastfood(jax.random.key(3), 100)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(c),
                                                    jax.tree_util.tree_leaves(again)))
    other = ff.make_fastfood(jax.random.key(4), 100)
    assert not np.array_equal(c.permutation, other.permutation)


@pytest.mark.parametrize("d", [1, 5, 128, 300])  # d > L=128: the vector is cut
def test_fastfood_project_matches_dense_matrix(d):
    c = ff.make_fastfood(jax.random.key(d), 100)
    v = np.random.default_rng(d).normal(size=d).astype(np.float32)
    out = project(jnp.asarray(v), c)
    assert out.shape == (100,) and out.dtype == jnp.float32
    _close(out, _dense_fastfood(c, d) @ v)


def test_fastfood_project_stacked_rows_equal_single():
    draws = [ff.make_fastfood(jax.random.key(i), 40) for i in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *draws)
    v = jnp.asarray(np.random.default_rng(0).normal(size=10), jnp.float32)
    rows = project(v, stacked)
    for i, c in enumerate(draws):
        _close(rows[i], project(v, c), rtol=1e-6)


def _torch_original_projection(torch, v, c, original_backward):
    """The original's fastfood_torched with its FastWalshHadamard (re-implemented here)."""

    def butterflies(x):  # fast_walsh_hadamard_torched(x, normalize=False), axis 0
        n = x.shape[0].bit_length() - 1
        y = x.view([1] + [2] * n + [1])
        for dim in range(1, n + 1):
            a, b = torch.chunk(y, 2, dim=dim)
            y = torch.cat((a + b, a - b), dim=dim)
        return y.view(x.shape)

    class OriginalFWHT(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(torch.tensor([1 / np.sqrt(float(x.size(0)))]).to(x))
            return butterflies(x.float())

        @staticmethod
        def backward(ctx, g):
            scale, = ctx.saved_tensors
            return scale * butterflies(g.clone().float())

    transform = OriginalFWHT.apply if original_backward else butterflies
    length, size = c.length, c.out_size
    signs = torch.tensor(np.asarray(c.signs), dtype=torch.float32)
    perm = torch.tensor(np.asarray(c.permutation), dtype=torch.long)
    gauss = torch.tensor(np.asarray(c.gaussian))
    x = torch.nn.functional.pad(v, pad=(0, length - v.shape[0]), value=0.0, mode="constant")
    y = transform(x * signs)[perm] * gauss
    return transform(y)[:size] / (float(c.divisor) * np.sqrt(float(size) / length))


@pytest.mark.parametrize("d,size", [(37, 300), (700, 300)])
def test_gradient_scaling_of_the_original_backward(d, size):
    torch = pytest.importorskip("torch")
    c = ff.make_fastfood(jax.random.key(size), size)
    v = np.random.default_rng(d).normal(size=d).astype(np.float32)
    w = np.random.default_rng(size).normal(size=size).astype(np.float32)

    @jax.jit
    def ours(x):  # forward, true gradient, original-scale gradient
        def loss(y, original):
            return jnp.vdot(w, ff.fastfood_project(y, c, original_gradient_scale=original))
        return ff.fastfood_project(x, c), jax.grad(loss)(x, False), jax.grad(loss)(x, True)

    out_jax, *grads_jax = ours(jnp.asarray(v))
    grads = {}
    for original in (False, True):
        tv = torch.tensor(v, requires_grad=True)
        out = _torch_original_projection(torch, tv, c, original)
        (out * torch.tensor(w)).sum().backward()
        grads[original] = tv.grad.numpy()
        _close(out_jax, out.detach().numpy(), rtol=1e-5)
        _close(grads_jax[original], grads[original], rtol=1e-5)
    # The original's backward: the true gradient divided by L (L^-1/2 per transform).
    _close(grads[True], grads[False] / c.length, rtol=1e-5)
    _close(grads[False], _dense_fastfood(c, d).T @ w, rtol=1e-5)


# ----------------------------------------------------------------------------- layout


@functools.lru_cache(maxsize=None)
def _abstract_params(preset):
    model = T5ForConditionalGeneration(get_preset(preset))
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda k: model.init(k, ids, jnp.ones_like(ids), ids)["params"],
                          jax.random.key(0))


def test_t5_base_trainable_count_is_the_originals():
    shapes = said_lib.param_shapes(_abstract_params("t5-base"))
    # HF T5-base named_parameters(): 257 tensors (the tied lm_head is the embedding's):
    # shared 1 + encoder 12 x 8 + rel. bias + final norm + decoder 12 x 13 + rel. bias + norm.
    # The original: vector = 20000 - (257 + 1), said = 257 + 1 ones.
    layout = said_lib.intrinsic_layout(shapes, 20000, said=True)
    assert len(layout.tensors) == 257
    assert (layout.vector_size, layout.said_size, layout.trainable_count) == (19742, 258, 20000)
    plain = said_lib.intrinsic_layout(shapes, 20000, said=False)
    assert (plain.vector_size, plain.said_size, plain.trainable_count) == (20000, 0, 20000)
    scanned = said_lib.param_shapes(jax.eval_shape(stack_blocks, _abstract_params("t5-base")))
    scanned_layout = said_lib.intrinsic_layout(scanned, 20000)
    assert [t.name for t in scanned_layout.tensors] == [t.name for t in layout.tensors]
    assert scanned_layout.trainable_count == 20000


@pytest.mark.parametrize("preset", ["t5-base", "t5-v1_1-small"])
def test_said_order_is_hf_named_parameters_order(preset):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = get_preset(preset)
    hf_config = transformers.T5Config(**config.to_hf_dict())
    # transformers 5 ignores tie_word_embeddings passed to T5Config(...); set it afterwards.
    hf_config.tie_word_embeddings = config.tie_word_embeddings
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_config)
    layout = said_lib.intrinsic_layout(said_lib.param_shapes(_abstract_params(preset)), 20000)
    # transformers 5 gives untied models their own encoder/decoder embed_tokens; in the
    # original's transformers 4.6 they are the `shared` module itself (one tensor).
    names = [n for n, _ in hf.named_parameters() if ".embed_tokens." not in n]
    assert [t.hf_name for t in layout.tensors] == names
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    for t in layout.tensors:  # the projection is shaped as the torch tensor, then transposed
        assert (t.shape[::-1] if t.transpose else t.shape) == hf_shapes[t.hf_name]


def test_layout_errors():
    shapes = {"shared/embedding": (8, 4), "encoder/final_layer_norm/scale": (4,)}
    with pytest.raises(ValueError, match="intrinsic_dim=3"):
        said_lib.intrinsic_layout(shapes, 3, said=True)  # 2 tensors: needs >= 4
    assert said_lib.intrinsic_layout(shapes, 4, said=True).vector_size == 1
    with pytest.raises(ValueError, match="empty"):
        said_lib.intrinsic_layout({}, 100)


# ----------------------------------------------------------------------------- Intrinsic-SAID


def _tiny_tree(num_blocks=1, dtype=jnp.float32, full_blocks=True):
    """A small T5-like tree: embeddings, layer norms, square and non-square kernels.
    full_blocks=False keeps one attention kernel per block (faster to compile)."""
    rng = np.random.default_rng(0)
    tree = {"shared": {"embedding": rng.normal(size=(10, 4))},
            "encoder": {"relative_attention_bias": {"embedding": rng.normal(size=(3, 2))},
                        "final_layer_norm": {"scale": rng.normal(size=(4,))}}}
    for i in range(num_blocks):
        attention = {p: {"kernel": rng.normal(size=(4, 4))} for p in
                     ("qkvo" if full_blocks else "q")}
        ffn = {"wi": {"kernel": rng.normal(size=(4, 6))}, "wo": {"kernel": rng.normal(size=(6, 4))}}
        tree["encoder"][f"block_{i}"] = {
            "layer_0": {"SelfAttention": attention, "layer_norm": {"scale": rng.normal(size=(4,))}},
            "layer_1": {"DenseReluDense": ffn if full_blocks else {"wi": ffn["wi"]},
                        "layer_norm": {"scale": rng.normal(size=(4,))}}}
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _random_trainable(trainable, seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in trainable.items()}


def test_init_intrinsic_and_identity_at_zero():
    theta0 = _tiny_tree()
    trainable, constants = said_lib.init_intrinsic(jax.random.key(0), said_lib.param_shapes(theta0), 100)
    n = len(constants.layout.tensors)
    assert n == 1 + 2 + 8
    assert trainable["vector"].shape == (100 - n - 1,) and not trainable["vector"].any()
    assert trainable["said"].shape == (n + 1,) and (trainable["said"] == 1).all()
    out = params_fn(trainable, theta0, constants)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: a.dtype == b.dtype and bool((a == b).all()), out, theta0))
    plain, _ = said_lib.init_intrinsic(jax.random.key(0), said_lib.param_shapes(theta0), 100, said=False)
    assert set(plain) == {"vector"} and plain["vector"].shape == (100,)


@pytest.mark.parametrize("said", [True, False])
def test_intrinsic_params_per_tensor_formula(said):
    theta0 = _tiny_tree()
    trainable, constants = said_lib.init_intrinsic(jax.random.key(1), said_lib.param_shapes(theta0), 60, said)
    trainable = _random_trainable(trainable)
    out = traverse_util.flatten_dict(params_fn(trainable, theta0, constants))
    flat0 = traverse_util.flatten_dict(theta0)
    v = np.asarray(trainable["vector"], np.float64)
    for i, t in enumerate(constants.layout.tensors):
        c = _row(constants.groups[t.group], t.row)
        ray = _dense_fastfood(c, v.shape[0]) @ v
        ray = ray.reshape(t.shape[::-1]).T if t.transpose else ray.reshape(t.shape)
        lam = float(trainable["said"][i]) if said else 1.0
        path = tuple(t.name.split("/"))
        _close(out[path], np.asarray(flat0[path], np.float64) + lam * ray, rtol=1e-5)


def test_scanned_and_unscanned_give_the_same_parameters():
    unscanned = _tiny_tree(num_blocks=2, full_blocks=False)
    scanned = stack_blocks(unscanned)
    key = jax.random.key(7)
    t_u, c_u = said_lib.init_intrinsic(key, said_lib.param_shapes(unscanned), 200)
    t_s, c_s = said_lib.init_intrinsic(key, said_lib.param_shapes(scanned), 200)
    assert [t.name for t in c_u.layout.tensors] == [t.name for t in c_s.layout.tensors]
    trainable = _random_trainable(t_u, seed=3)
    assert jax.tree_util.tree_map(jnp.shape, trainable) == jax.tree_util.tree_map(jnp.shape, t_s)
    out_u = params_fn(trainable, unscanned, c_u)
    out_s = params_fn(trainable, scanned, c_s)
    jax.tree_util.tree_map(lambda a, b: _close(a, b, rtol=1e-6), stack_blocks(out_u), out_s)


def test_chunked_groups_jit_and_bfloat16():
    theta0 = _tiny_tree(num_blocks=3, dtype=jnp.bfloat16, full_blocks=False)
    trainable, constants = said_lib.init_intrinsic(jax.random.key(2), said_lib.param_shapes(theta0), 80)
    trainable = _random_trainable(trainable)
    whole = params_fn(trainable, theta0, constants)
    # The q kernels' group (3 rows of L=16) in chunks of 2 rows: the lax.map path.
    chunked = params_fn(trainable, theta0, constants, max_chunk_elements=40)
    for a, b, c in zip(*(jax.tree_util.tree_leaves(x) for x in (whole, chunked, theta0))):
        assert a.dtype == b.dtype == c.dtype == jnp.bfloat16
        _close(a.astype(jnp.float32), b.astype(jnp.float32), rtol=1e-2)


def test_intrinsic_gradients_true_and_original_scale():
    theta0 = _tiny_tree(full_blocks=False)
    trainable, constants = said_lib.init_intrinsic(jax.random.key(5), said_lib.param_shapes(theta0), 50)
    trainable = _random_trainable(trainable)
    weights = traverse_util.flatten_dict(jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.random.default_rng(a.size).normal(size=a.shape), jnp.float32),
        theta0))

    def loss(t, original):
        out = params_fn(t, theta0, constants, original_gradient_scale=original)
        return sum(jnp.vdot(weights[k], v) for k, v in traverse_util.flatten_dict(out).items())

    true_vec, orig_vec = 0.0, 0.0
    said_grad = np.zeros(constants.layout.said_size)
    v = np.asarray(trainable["vector"], np.float64)
    for i, t in enumerate(constants.layout.tensors):
        c = _row(constants.groups[t.group], t.row)
        w = np.asarray(weights[tuple(t.name.split("/"))], np.float64)
        w = (w.T if t.transpose else w).reshape(-1)  # in the projection's (torch) layout
        m = _dense_fastfood(c, v.shape[0])
        lam = float(trainable["said"][i])
        true_vec = true_vec + lam * (m.T @ w)
        orig_vec = orig_vec + lam * (m.T @ w) / c.length
        said_grad[i] = w @ (m @ v)
    both = jax.jit(lambda t: (jax.grad(loss)(t, False), jax.grad(loss)(t, True)))(trainable)
    for g, expected in zip(both, (true_vec, orig_vec)):
        _close(g["vector"], expected, rtol=1e-5)
        _close(g["said"], said_grad, rtol=1e-5)  # exact in both modes; last entry unused: 0
        assert float(g["said"][-1]) == 0.0


def test_intrinsic_params_errors():
    theta0 = _tiny_tree()
    trainable, constants = said_lib.init_intrinsic(jax.random.key(0), said_lib.param_shapes(theta0), 50)
    with pytest.raises(ValueError, match=r"trainable\['vector'\]"):
        params_fn({**trainable, "vector": jnp.zeros(3)}, theta0, constants)
    with pytest.raises(ValueError, match=r"trainable\['said'\]"):
        params_fn({"vector": trainable["vector"]}, theta0, constants)
    missing = {**theta0, "shared": {}}
    with pytest.raises(ValueError, match="shared/embedding"):
        params_fn(trainable, missing, constants)
    wrong = {**theta0, "shared": {"embedding": jnp.zeros((10, 5))}}
    with pytest.raises(ValueError, match="shape"):
        params_fn(trainable, wrong, constants)



# ----------------------------------------------------------------------------- the method


def test_the_preset_counts_what_the_original_counts():
    from compacter_jax import params as param_report

    method = peft.get_method("intrinsic_said")
    assert (method.dim, method.said, method.learning_rate) == (20_000, True, 3e-2)
    assert method.task_prefix and not method.bankable
    r = param_report.report(get_preset("t5-base"), method)
    assert r.trainable == 20_000 and r.peft == 0
    assert round(100 * 20_000 / 222_882_048, 3) == 0.009      # the paper's "% trained"


def test_partition_combine_and_an_export_round_trip(tmp_path):
    method = peft.get_method("intrinsic_said", dim=300)
    model, params = peft.from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(0))
    trainable, frozen = method.partition(params)
    assert set(trainable) == {"vector", "said"} and peft.count(trainable) == 300
    same = method.combine(trainable, frozen)               # zero vector: the backbone itself
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = {**trainable, "vector": jnp.full_like(trainable["vector"], 0.1)}
    peft.save_adapter(tmp_path / "said", moved, method, model="random:t5-tiny",
                      backbone_params=params)     # its fingerprint is checked on load
    reloaded_model, reloaded = peft.load_adapter(tmp_path / "said")   # constants redrawn
    for a, b in zip(jax.tree_util.tree_leaves(reloaded),
                    jax.tree_util.tree_leaves(method.combine(moved, frozen))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(reloaded["shared"]["embedding"]),
                              np.asarray(params["shared"]["embedding"]))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        peft.get_method("intrinsic_said", dim=0)
