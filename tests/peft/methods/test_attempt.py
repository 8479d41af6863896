"""ATTEMPT: the per-input mixture against an explicit numpy computation on a tiny T5; the
trainable set; source prompts from prompt-tuning exports; packing and banking refused; the
T5-base count against the paper's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from tiny import TINY, ids, init_fn

from compacter_jax import params as params_cli
from compacter_jax.models import get_preset
from compacter_jax.peft import AdapterFileError, bank, build_model, get_method, save_adapter
from compacter_jax.peft.methods.attempt import AttemptMethod, AttemptPrompt

L, D = 3, TINY.d_model


def _export(path, length=L, d_model=D, seed=0, method="prompt_tuning"):
    """A prompt-tuning export holding a random soft prompt, as experiments.glue writes one."""
    prompt = np.random.default_rng(seed).normal(size=(length, d_model)).astype(np.float32)
    save_adapter(path, {"encoder": {"prompt": {"embedding": prompt}}},
                 get_method(method, length=length), model="random:t5-tiny", init_seed=0)
    return str(path), prompt


@pytest.fixture
def sources(tmp_path):
    return [_export(tmp_path / f"src{k}", seed=k) for k in range(2)]


def _model_and_params(sources, **fields):
    method = get_method("attempt", sources=tuple(p for p, _ in sources), length=L, **fields)
    model = build_model(TINY, method)
    params = method.prepare(init_fn(model)(jax.random.PRNGKey(0)), TINY)
    # Every trained leaf random (the norm's scale/bias too), so each one matters below.
    flat = traverse_util.flatten_dict(params)
    rng = np.random.default_rng(7)
    for k in flat:
        if k[:2] == ("encoder", "prompt") and k[-1] != "sources":
            flat[k] = jnp.asarray(rng.normal(size=flat[k].shape), jnp.float32)
    return method, model, traverse_util.unflatten_dict(flat)


def _reference(x_ids, mask, params, temperature):
    """The paper's mixture in float64 numpy, written out step by step."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["encoder"]["prompt"])
    emb = np.asarray(params["shared"]["embedding"], np.float64)[np.asarray(x_ids)]   # [B, T, D]
    pooled = np.stack([emb[b][np.asarray(mask[b]).astype(bool)].max(axis=0)
                       for b in range(emb.shape[0])])                             # [B, D]
    z = pooled @ p["down"]["kernel"]
    z = (z / (1 + np.exp(-z))) @ p["up"]["kernel"]                               # SiLU, up
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    query = z * p["norm"]["scale"] + p["norm"]["bias"]
    prompts = np.concatenate([p["sources"], p["embedding"][None]])               # [K+1, L, D]
    logits = query @ prompts.max(axis=1).T / temperature
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    mixed = p["embedding"][None] + np.einsum("bk,kld->bld", w, prompts)
    return w, mixed, emb


@pytest.mark.parametrize("temperature", [None, 2.0])      # None: d_model * e (near uniform)
def test_mixture_matches_numpy(sources, temperature):
    method, model, params = _model_and_params(sources, temperature=temperature)
    x = ids(b=3, t=6)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])   # padding masked out
    t = D * math.e if temperature is None else temperature
    w_ref, mixed_ref, emb = _reference(x, mask, params, t)
    # The module alone: its output is [mixture; embeddings] and the mask gets L ones in front.
    out, out_mask = AttemptPrompt(L, D, 2, method.attn_dim, t).apply(
        {"params": params["encoder"]["prompt"]}, jnp.asarray(emb, jnp.float32), mask)
    tol = dict(rtol=20 * np.finfo(np.float32).eps * math.sqrt(D),
               atol=20 * np.finfo(np.float32).eps * math.sqrt(D) * np.abs(mixed_ref).max())
    np.testing.assert_allclose(out[:, :L], mixed_ref, **tol)
    np.testing.assert_allclose(out[:, L:], emb, **tol)
    np.testing.assert_array_equal(out_mask, np.concatenate([np.ones((3, L)), mask], 1))
    # Inside the T5: the weights the encoder computed from its own embedding lookup.
    _, inter = model.apply({"params": params}, x, mask, method=model.encode,
                           mutable=["intermediates"])
    w = inter["intermediates"]["encoder"]["prompt"]["attention"][0]
    np.testing.assert_allclose(w, w_ref, rtol=tol["rtol"], atol=1e-6)
    assert w.shape == (3, 3) and (temperature is None or np.ptp(w_ref) > 0.1)
    # The sources in the tree are the exported prompts; "source" init copies the first.
    np.testing.assert_array_equal(params["encoder"]["prompt"]["sources"],
                                  np.stack([s for _, s in sources]))


def test_trainable_set_is_target_prompt_and_attention(sources):
    method, _, params = _model_and_params(sources)
    trainable, frozen = method.partition(params)
    names = set(traverse_util.flatten_dict(trainable, sep="/"))
    assert names == {"encoder/prompt/embedding", "encoder/prompt/down/kernel",
                     "encoder/prompt/up/kernel", "encoder/prompt/norm/scale",
                     "encoder/prompt/norm/bias"}
    assert "encoder/prompt/sources" in traverse_util.flatten_dict(frozen, sep="/")
    assert method.trainable_count(params) == L * D + 2 * D * 100 + 2 * D


def test_gradients_reach_the_target_and_the_attention_only(sources):
    _, _, params = _model_and_params(sources)
    emb = jax.random.normal(jax.random.PRNGKey(1), (2, 5, D))
    module = AttemptPrompt(L, D, 2, 100, 2.0)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(module.apply({"params": p}, emb,
                                                            jnp.ones((2, 5)))[0]))))(
        params["encoder"]["prompt"])
    norms = {k: float(jnp.abs(v).max()) for k, v in traverse_util.flatten_dict(
        grads, sep="/").items()}
    assert norms.pop("sources") == 0.0 and min(norms.values()) > 0, norms


def test_target_prompt_inits(sources, tmp_path):
    method, _, _ = _model_and_params(sources)
    model = build_model(TINY, method)
    raw = init_fn(model)(jax.random.PRNGKey(0))
    got = method.replace(init_source=1).prepare(raw, TINY)["encoder"]["prompt"]
    np.testing.assert_array_equal(got["embedding"], sources[1][1])
    got = method.replace(init="vocab", vocab_ids=(5, 0, 9)).prepare(raw, TINY)
    np.testing.assert_array_equal(got["encoder"]["prompt"]["embedding"],
                                  raw["shared"]["embedding"][jnp.array([5, 0, 9])])
    got = method.replace(init="uniform").prepare(raw, TINY)["encoder"]["prompt"]["embedding"]
    np.testing.assert_array_equal(got, raw["encoder"]["prompt"]["embedding"])


def test_bad_sources_are_refused(sources, tmp_path):
    method, _, _ = _model_and_params(sources)
    raw = init_fn(build_model(TINY, method))(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no source prompts; set sources"):
        get_method("attempt", length=L).prepare(raw, TINY)
    long_path, _ = _export(tmp_path / "long", length=L + 1)
    with pytest.raises(ValueError, match=r"long: prompt of shape \(4, 64\), expected"):
        method.replace(sources=(sources[0][0], long_path)).prepare(raw, TINY)
    with pytest.raises(FileNotFoundError, match="missing"):
        method.replace(sources=(str(tmp_path / "missing"), sources[0][0])).prepare(raw, TINY)
    lora = tmp_path / "lora"
    save_adapter(lora, {"encoder": {"prompt": {"embedding": np.zeros((L, D), np.float32)}}},
                 get_method("lora"), model="random:t5-tiny", init_seed=0)
    with pytest.raises(ValueError, match="an export of 'lora'.*prompt_tuning runs"):
        method.replace(sources=(sources[0][0], str(lora))).prepare(raw, TINY)
    assert get_method("attempt", sources="a/x,b/y").sources == ("a/x", "b/y")
    assert get_method("attempt", sources=("a/x,b/y",)).sources == ("a/x", "b/y")
    with pytest.raises(ValueError, match="init_source=2 but there are 2 sources"):
        method.replace(init_source=2)
    with pytest.raises(ValueError, match="init='zeros'"):
        method.replace(init="zeros")
    with pytest.raises(AdapterFileError):   # a source export edited after the fact
        cfg = tmp_path / "src0" / "trainable_config.json"
        cfg.write_text(cfg.read_text().replace('"length": 3', '"length": 4'))
        method.prepare(raw, TINY)


def test_packing_and_banking_refused(sources):
    method, model, params = _model_and_params(sources)
    assert not method.packable
    x = ids()
    with pytest.raises(ValueError, match="does not support packed inputs; set packing off"):
        model.apply({"params": params}, x, jnp.ones_like(x), method=model.encode,
                    encoder_segment_ids=jnp.ones_like(x), encoder_positions=jnp.ones_like(x))
    with pytest.raises(bank.BankError, match="shares one attention module"):
        bank.check_bankable(method)


def test_t5_base_count_against_the_paper():
    # Target prompt 100 x 768 + W_down 768 x 100 + W_up 100 x 768 + LayerNorm 2 x 768.
    r = params_cli.report(get_preset("t5-base"), AttemptMethod(name="attempt", sources=("a",) * 6))
    assert r.trainable == 76_800 + 76_800 + 76_800 + 1_536 == 231_936
    assert round(r.trainable, -3) == 232_000                 # paper Table 1: ATTEMPT 232K/task
    assert r.peft == r.trainable + 6 * 76_800                # frozen sources: not trained
    # Multi-task over the 8 GLUE tasks, one attention shared: 96K per task, the abstract's
    # "2,300 times fewer parameters than full fine-tuning" (220M).
    per_task = 76_800 + (r.trainable - 76_800) / 8
    assert round(per_task, -3) == 96_000 and abs(220e6 / per_task / 2_300 - 1) < 0.01


def test_an_export_refuses_source_prompts_that_changed(tmp_path):
    """The sources are read from their exports at every load: the export's fingerprint covers
    them, so a source re-trained after the ATTEMPT run is refused instead of silently mixed."""
    from compacter_jax.peft import from_pretrained, load_adapter

    d_model = get_preset("t5-tiny").d_model
    paths = [_export(tmp_path / f"src{k}", d_model=d_model, seed=k)[0] for k in range(2)]
    method = get_method("attempt", sources=tuple(paths), length=L)
    _, params = from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(3))
    trainable, _ = method.partition(params)
    save_adapter(tmp_path / "attempt", trainable, method, model="random:t5-tiny", init_seed=3,
                 backbone_params=params)
    _, reloaded = load_adapter(tmp_path / "attempt")          # unchanged sources: loads
    np.testing.assert_array_equal(reloaded["encoder"]["prompt"]["sources"],
                                  params["encoder"]["prompt"]["sources"])
    _export(tmp_path / "src1", d_model=d_model, seed=5)        # source 1 re-trained
    with pytest.raises(AdapterFileError, match="attempt's frozen inputs"):
        load_adapter(tmp_path / "attempt")


# ------------------------------------------------------------------------ multi-task bank

@pytest.fixture(scope="module")
def two_task_bank(tmp_path_factory):
    """A 2-task ATTEMPT bank on a tiny T5 (weights drawn with numpy, saved as a checkpoint, no
    dropout: the train step drops out): the tasks' target prompts differ, the attention (random,
    so every leaf matters) is one for both. Returns (method, model, params of task 0,
    trainables, frozen, shared paths, bank, backbone directory)."""
    from compacter_jax.models import is_backbone_path, param_shapes, save_pretrained

    tmp_path, cfg = tmp_path_factory.mktemp("bank"), TINY.replace(dropout_rate=0.0)
    rng = np.random.default_rng(11)
    method = get_method("attempt", sources=("a", "b"), length=L, attn_dim=8)  # set below
    flat = {p: jnp.asarray(rng.normal(size=x.shape) / math.sqrt(x.shape[-1]), jnp.float32)
            for p, x in traverse_util.flatten_dict(param_shapes(build_model(cfg, method))).items()}
    backbone = str(save_pretrained(tmp_path / "t5", cfg, traverse_util.unflatten_dict(
        {p: x for p, x in flat.items() if is_backbone_path(p)})))
    paths = tuple(str(save_adapter(tmp_path / f"src{k}", {"encoder": {"prompt": {"embedding": (
        rng.normal(size=(L, D)).astype(np.float32))}}}, get_method("prompt_tuning", length=L),
        model=backbone)) for k in range(2))
    method = method.replace(sources=paths)
    model = build_model(cfg, method)
    params = method.prepare(traverse_util.unflatten_dict(flat), cfg)
    trainable, frozen = method.partition(params)
    trainable = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, jnp.float32), trainable)
    other = {"encoder": {"prompt": {**trainable["encoder"]["prompt"], "embedding": jnp.asarray(
        rng.normal(size=(L, D)), jnp.float32)}}}
    shared = bank.shared_paths(method, trainable)
    return (method, model, method.combine(trainable, frozen), [trainable, other], frozen,
            shared, bank.stack_adapters([trainable, other], shared), backbone)


def _batch(vocab, b=4, s=5, t=3, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, s), np.int32)
    mask[1, 3:] = 0
    dec_mask = np.ones((b, t), np.int32)
    dec_mask[2, 2:] = 0
    return {"input_ids": jnp.asarray(rng.integers(2, vocab, (b, s)), jnp.int32),
            "attention_mask": jnp.asarray(mask),
            "decoder_input_ids": jnp.asarray(rng.integers(2, vocab, (b, t)), jnp.int32),
            "decoder_attention_mask": jnp.asarray(dec_mask),
            "labels": jnp.asarray(rng.integers(2, vocab, (b, t)), jnp.int32),
            "task_ids": jnp.asarray([0, 1, 1, 0], jnp.int32)}


def test_multitask_bank_holds_one_attention_and_a_prompt_per_task(two_task_bank):
    method, _, _, trainables, _, shared, banked, _ = two_task_bank
    d = D
    assert shared == {("encoder", "prompt", *leaf) for leaf in (
        ("down", "kernel"), ("up", "kernel"), ("norm", "scale"), ("norm", "bias"))}
    p = banked["encoder"]["prompt"]
    assert p["embedding"].shape == (2, L, d)                         # a target prompt per task
    assert p["down"]["kernel"].shape == (d, 8) and p["up"]["kernel"].shape == (8, d)
    assert p["norm"]["scale"].shape == p["norm"]["bias"].shape == (d,)   # one attention
    # 2 prompts of 3 x 64, W_down 64 x 8, W_up 8 x 64, LayerNorm 2 x 64.
    assert sum(x.size for x in jax.tree_util.tree_leaves(banked)) == 2 * 3 * d + 2 * d * 8 + 2 * d
    assert "sources" not in p                                          # frozen, not banked
    for k in range(2):                           # a slice is the single-task tree, exactly
        jax.tree_util.tree_map(np.testing.assert_array_equal,
                               bank.slice_adapter(banked, k, shared), trainables[k])
    with pytest.raises(bank.BankError, match="shares one attention module"):
        bank.make_bank_apply(lambda *a: None, method)                 # not shared: refused
    moved = {"encoder": {"prompt": {**trainables[1]["encoder"]["prompt"], "norm": {
        "scale": trainables[1]["encoder"]["prompt"]["norm"]["scale"] + 1,
        "bias": trainables[1]["encoder"]["prompt"]["norm"]["bias"]}}}}
    with pytest.raises(bank.BankError, match="norm/scale is shared .* different values"):
        bank.stack_adapters([trainables[0], moved], shared)


def _recording_tx():
    """An optimizer that keeps the gradient it gets as its state and moves nothing."""
    import optax

    zeros = lambda tree: jax.tree_util.tree_map(jnp.zeros_like, tree)  # noqa: E731
    return optax.GradientTransformation(zeros, lambda g, state, params=None: (zeros(g), g))


def test_joint_gradient_on_the_attention_is_the_sum_of_the_tasks(two_task_bank):
    """The shared attention's gradient in a joint step equals the sum of the two single-task
    gradients (each task's loss: its token mean, as a single-task step), each computed here
    on the plain (unbanked) model; each target prompt gets its own task's gradient only."""
    from compacter_jax.train import seq2seq_apply_fn
    from compacter_jax.train.multitask import init_multitask_state, make_multitask_train_step

    method, model, _, trainables, frozen, shared, banked, _ = two_task_bank
    batch = _batch(model.config.vocab_size)
    apply = seq2seq_apply_fn(model)
    step = make_multitask_train_step(
        bank.make_bank_apply(apply, method, shared), [_recording_tx()] * 2,
        total_steps=[5, 5], shared=shared, shared_tx=_recording_tx())
    state = init_multitask_state(banked, [_recording_tx()] * 2, 0, shared=shared,
                                 shared_tx=_recording_tx())
    state, _ = jax.jit(step)(state, frozen, batch)
    got_shared, got_tasks = state.opt_state[-1], state.opt_state[:2]

    def single_task_loss(trainable, sub):
        logits = apply(method.combine(trainable, frozen), sub, True, None).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        token = -jnp.take_along_axis(logp, sub["labels"][..., None], axis=-1)[..., 0]
        m = sub["decoder_attention_mask"].astype(jnp.float32)
        return jnp.sum(token * m) / jnp.sum(m)

    def rows_of(k):
        rows = np.flatnonzero(np.asarray(batch["task_ids"]) == k)
        return {key: v[rows] for key, v in batch.items() if key != "task_ids"}

    grad_fn = jax.jit(jax.grad(single_task_loss))       # 2 rows per task: one program
    grads = [grad_fn(trainables[k], rows_of(k)) for k in range(2)]
    want = jax.tree_util.tree_map(lambda a, b: a + b, grads[0], grads[1])["encoder"]["prompt"]
    eps = np.finfo(np.float32).eps
    for name in ("down", "up", "norm"):
        for leaf, g in got_shared["encoder"]["prompt"][name].items():
            w = np.asarray(want[name][leaf])
            np.testing.assert_allclose(g, w, rtol=100 * eps * math.sqrt(w.size),
                                       atol=100 * eps * np.abs(w).max(), err_msg=name + leaf)
    assert np.abs(np.asarray(grads[0]["encoder"]["prompt"]["up"]["kernel"])).max() > 0
    for k in range(2):
        g, w = (got_tasks[k]["encoder"]["prompt"]["embedding"],
                np.asarray(grads[k]["encoder"]["prompt"]["embedding"]))
        assert got_tasks[k]["encoder"]["prompt"]["down"]["kernel"] is None  # not the task tx's
        np.testing.assert_allclose(g, w, rtol=100 * eps * math.sqrt(w.size),
                                   atol=100 * eps * np.abs(w).max())


def test_a_task_of_the_bank_exports_as_single_task_attempt(two_task_bank, tmp_path):
    """Task k's slice, saved, loads with `load_adapter` as a single-task ATTEMPT adapter (the
    shared attention copied in) and gives the bank's logits for that task's rows."""
    from compacter_jax.peft import load_adapter
    from compacter_jax.train import seq2seq_apply_fn

    method, model, params, _, frozen, shared, banked, backbone = two_task_bank
    batch = _batch(model.config.vocab_size, seed=1)
    logits = jax.jit(bank.make_bank_apply(seq2seq_apply_fn(model), method, shared))(
        banked, frozen, batch)
    plain = jax.jit(seq2seq_apply_fn(model), static_argnums=(2, 3))   # one program, both tasks
    for k in range(2):
        save_adapter(tmp_path / f"task{k}", bank.slice_adapter(banked, k, shared), method,
                     model=backbone, backbone_params=params)
        single, loaded = load_adapter(tmp_path / f"task{k}")
        assert single.hooks == model.hooks and single.config == model.config.replace(
            dropout_rate=single.config.dropout_rate)           # single-task ATTEMPT, same T5
        rows = np.flatnonzero(np.asarray(batch["task_ids"]) == k)
        sub = {key: v[rows] for key, v in batch.items() if key != "task_ids"}
        want = plain(loaded, sub, True, None)
        scale = float(np.abs(np.asarray(want)).max())
        np.testing.assert_allclose(logits[rows], want, rtol=1e-5, atol=1e-5 * scale)
