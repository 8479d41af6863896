"""Ladder Side-Tuning: logits at init equal the side network computed by hand (numpy) from
the hidden states of HF PyTorch's T5 (the independent backbone reference); the pruned
initialisation; no backbone weight or backbone-internal activation in the backward pass (a
check that fails for Compacter++); decoding with the side network's KV cache; exports."""

from __future__ import annotations

import functools

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compacter_jax import peft
from compacter_jax.models import (T5ForConditionalGeneration, greedy_generate, param_shapes,
                                  shift_right, stack_blocks)
from compacter_jax.models.t5 import relative_position_bucket
from compacter_jax.peft.methods.lst import kept_layers
from compacter_jax.train import seq2seq_apply_fn, token_loss_sum

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny HF T5 v1.0 (relu, tied, scaled): d_model 32, d_kv 8, d_ff 48, 4 heads; 3 + 2 blocks.
HF = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_decoder_layers=2,
          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
          feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0)
# r = 4 (side d_model 8, d_kv 2, d_ff 12); drop_every=2 drops encoder blocks 0, 2 and decoder 0.
METHOD = peft.get_method("lst", reduction_factor=4, drop_every=2)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """(HF PyTorch model, its checkpoint directory)."""
    tmp = str(tmp_path_factory.mktemp("lst_hf"))
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF)).eval()
    hf.save_pretrained(tmp)
    return hf, tmp


@pytest.fixture(scope="module")
def hf_and_ours(backbone):
    hf, tmp = backbone
    model, params = peft.from_pretrained(tmp, METHOD, jax.random.PRNGKey(3))
    return hf, model, params


@pytest.fixture(scope="module")
def scanned(hf_and_ours):
    """(model, params): the same backbone, stacked, on a scanned model (no compiled init;
    `test_from_pretrained_scanned_is_the_unscanned_stacked` checks the loading path)."""
    _, model, params = hf_and_ours
    return peft.build_model(model.config.replace(scan_layers=True), METHOD), stack_blocks(params)


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(2, 64, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    ids[mask == 0] = 0
    labels = rs.randint(2, 64, (2, 4)).astype(np.int32)
    dmask = np.ones_like(labels)
    dmask[1, 3:] = 0
    labels[dmask == 0] = 0
    return ids, mask, shift_right(labels).astype(np.int32), dmask, labels


def _hf_taps(hf, ids, mask, dec, dmask):
    """Backbone states from HF PyTorch: each stack's input embedding and every block output."""
    taps = {"encoder": [], "decoder": []}
    handles = [blk.register_forward_hook(lambda m, i, o, s=stack: taps[s].append(o[0].numpy()))
               for stack in ("encoder", "decoder") for blk in getattr(hf, stack).block]
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    with torch.no_grad():
        hf(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
           decoder_attention_mask=t(dmask))
    for h in handles:
        h.remove()
    emb = hf.shared.weight.detach().numpy()
    return [emb[ids]] + taps["encoder"], [emb[dec]] + taps["decoder"], emb


# --- the side network by hand (numpy) ------------------------------------------------------
def _rms(x, scale, eps=1e-6):
    return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _attention(x, kv, p, bias, heads):
    b, t, _ = x.shape
    s = kv.shape[1]
    q = (x @ p["q"]["kernel"]).reshape(b, t, heads, -1)
    k = (kv @ p["k"]["kernel"]).reshape(b, s, heads, -1)
    v = (kv @ p["v"]["kernel"]).reshape(b, s, heads, -1)
    scores = np.einsum("bthd,bshd->bhts", q, k) + bias  # T5: no 1/sqrt(d) scaling
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, -1) @ p["o"]["kernel"]


def _position_bias(table, t, bidirectional):
    rel = np.arange(t)[None, :] - np.arange(t)[:, None]
    buckets = np.asarray(relative_position_bucket(rel, bidirectional, HF[
        "relative_attention_num_buckets"], HF["relative_attention_max_distance"]))
    return np.transpose(table[buckets], (2, 0, 1))[None]  # [1, H, T, T]


def _side_stack(p, taps, layers, self_bias, enc=None, cross_bias=None):
    """Side encoder/decoder: downsample, gated ladder before each kept block, final norm."""
    dense = lambda x, q: x @ q["kernel"] + q["bias"]  # noqa: E731
    s = dense(taps[0], p["first_downsample"])
    st = p["stack"]
    for j, i in enumerate(layers):
        lad = st[f"ladder_{j}"]
        g = 1.0 / (1.0 + np.exp(-lad["gate"] / METHOD.gate_temperature))
        s = g * s + (1 - g) * dense(taps[i + 1], lad["down"])
        blk = st[f"block_{j}"]
        a = blk["layer_0"]
        x = _rms(s, a["layer_norm"]["scale"])
        s = s + _attention(x, x, a["SelfAttention"], self_bias, HF["num_heads"])
        ff = "layer_1"
        if enc is not None:
            c = blk["layer_1"]
            s = s + _attention(_rms(s, c["layer_norm"]["scale"]), enc, c["EncDecAttention"],
                               cross_bias, HF["num_heads"])
            ff = "layer_2"
        f = blk[ff]
        y = np.maximum(_rms(s, f["layer_norm"]["scale"]) @ f["DenseReluDense"]["wi"]["kernel"], 0)
        s = s + y @ f["DenseReluDense"]["wo"]["kernel"]
    return _rms(s, st["final_layer_norm"]["scale"])


def _lst_logits_by_hand(params, enc_taps, dec_taps, emb, mask, dmask):
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    neg = np.finfo(np.float32).min
    t_src, t_tgt = mask.shape[1], dmask.shape[1]
    enc_bias = (_position_bias(p["side_encoder"]["stack"]["relative_attention_bias"]["embedding"],
                               t_src, True) + np.where(mask[:, None, None, :], 0.0, neg))
    side_enc = _side_stack(p["side_encoder"], enc_taps, kept_layers(3, 2, ()), enc_bias)
    causal = np.tril(np.ones((t_tgt, t_tgt), bool))[None, None] & dmask[:, None, None, :]
    dec_bias = (_position_bias(p["side_decoder"]["stack"]["relative_attention_bias"]["embedding"],
                               t_tgt, False) + np.where(causal, 0.0, neg))
    cross_bias = np.where(mask[:, None, None, :], 0.0, neg)
    side_dec = _side_stack(p["side_decoder"], dec_taps, kept_layers(2, 2, ()), dec_bias,
                           side_enc, cross_bias)
    up = side_dec @ p["side_decoder"]["upsample"]["kernel"] + p["side_decoder"]["upsample"]["bias"]
    return (up * HF["d_model"] ** -0.5) @ emb.T  # tied lm_head, T5 v1.0 scaling


def _perturbed(params, seed=1):
    """Side parameters moved off their init (non-zero biases, gates away from 0.5)."""
    rs = np.random.RandomState(seed)
    flat = traverse_util.flatten_dict(params)
    for k, v in flat.items():
        if k[0].startswith("side_"):
            flat[k] = v + jnp.asarray(0.3 * rs.randn(*v.shape), v.dtype)
    return traverse_util.unflatten_dict(flat)


def test_logits_equal_the_side_network_computed_by_hand(hf_and_ours):
    hf, model, params = hf_and_ours
    ids, mask, dec, dmask, _ = _batch()
    enc_taps, dec_taps, emb = _hf_taps(hf, ids, mask, dec, dmask)
    assert [t.shape for t in enc_taps] == [(2, 7, 32)] * 4
    for p in (params, _perturbed(params)):
        got = np.asarray(_apply(model, p, ids, mask, dec, dmask))
        want = _lst_logits_by_hand(p, [t.astype(np.float64) for t in enc_taps],
                                   [t.astype(np.float64) for t in dec_taps],
                                   emb.astype(np.float64), mask, dmask)
        # float32 through ~10 matmuls of width <= 64 vs float64: a few eps32 * sqrt(n) * |x|.
        scale = np.abs(want).max()
        assert scale > 0.1
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
    # The backbone's final states are not used: the same backbone with other side weights
    # gives other logits.
    assert np.abs(np.asarray(_apply(model, _perturbed(params), ids, mask, dec, dmask))
                  - np.asarray(_apply(model, params, ids, mask, dec, dmask))).max() > 1e-2


def test_side_blocks_start_as_the_pruned_backbone(hf_and_ours):
    _, _, params = hf_and_ours
    p = jax.tree_util.tree_map(np.asarray, params)
    emb = p["shared"]["embedding"]
    # Embedding: the 8 of 32 columns of largest L1 norm.
    cols = np.sort(np.argsort(-np.abs(emb).sum(0))[:8])
    blk = p["encoder"]["block_0"]["layer_0"]
    qkv = [blk["SelfAttention"][n]["kernel"][cols] for n in "qkv"]
    heads = np.sort(np.argsort(-np.abs(qkv[0] * qkv[1] * qkv[2]).sum(0))[:8])
    side = p["side_encoder"]["stack"]
    np.testing.assert_array_equal(side["relative_attention_bias"]["embedding"],
                                  p["encoder"]["relative_attention_bias"]["embedding"])
    # The chain through (dropped) encoder block 0 by hand; side block 0 is backbone block 1.
    o = blk["SelfAttention"]["o"]["kernel"][heads]
    res = np.sort(np.argsort(-np.abs(o).sum(0))[:8])
    ff = p["encoder"]["block_0"]["layer_1"]["DenseReluDense"]
    wi = ff["wi"]["kernel"][res]
    hid = np.sort(np.argsort(-np.abs(wi).sum(0))[:12])
    res = np.sort(np.argsort(-np.abs(ff["wo"]["kernel"][hid]).sum(0))[:8])
    b1 = p["encoder"]["block_1"]["layer_0"]
    np.testing.assert_array_equal(side["block_0"]["layer_0"]["layer_norm"]["scale"],
                                  b1["layer_norm"]["scale"][res])
    q1 = [b1["SelfAttention"][n]["kernel"][res] for n in "qkv"]
    heads1 = np.sort(np.argsort(-np.abs(q1[0] * q1[1] * q1[2]).sum(0))[:8])
    np.testing.assert_array_equal(side["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"],
                                  q1[0][:, heads1])
    # "random" keeps the fresh initialisation.
    fresh = METHOD.replace(side_init="random").prepare(params, None)
    assert fresh is params


def _loss_fn(model, method, frozen, batch):
    apply_fn = seq2seq_apply_fn(model)

    def loss(trainable):
        logits = apply_fn(method.combine(trainable, frozen), batch, True, None)
        return token_loss_sum(logits, batch["labels"], batch["decoder_attention_mask"])[0]
    return loss


def backward_violations(model, method, params, batch):
    """What the backward pass of `method` reads from the backbone: frozen weights (other than
    the output embedding the logits are computed with) and activations of the backbone's
    d_ff width (its feed-forward hidden states; the side network's are d_ff / r).

    The leaves of the function `jax.vjp` returns are its residuals: exactly what the backward
    program reads from the forward pass (computed here under jit: one compile)."""
    trainable, frozen = method.partition(params)

    def residuals_of(trainable, frozen):
        return jax.vjp(_loss_fn(model, method, frozen, batch), trainable)[1]
    residuals = [np.asarray(r) for r in
                 jax.tree_util.tree_leaves(jax.jit(residuals_of)(trainable, frozen))]
    out_head = {("shared", "embedding"), ("lm_head", "kernel")}
    weights = [(k, np.asarray(v)) for k, v in traverse_util.flatten_dict(frozen).items()
               if k not in out_head]
    cfg = model.config
    out = []
    for r in residuals:
        for k, w in weights:
            if r.shape == w.shape and np.array_equal(r, w):
                out.append("weight " + "/".join(k))
        if r.ndim >= 3 and r.shape[-1] == cfg.d_ff:
            out.append(f"activation {r.shape} (d_ff)")
    return out


def _random_params(model, seed=0):
    """Random params for every leaf of `model`, drawn with numpy (no compiled init)."""
    rs = np.random.RandomState(seed)
    flat = traverse_util.flatten_dict(param_shapes(model))
    return traverse_util.unflatten_dict({
        k: jnp.asarray(1.0 + 0.1 * rs.randn(*v.shape) if k[-1] == "scale" else
                       rs.randn(*v.shape) / np.sqrt(v.shape[-2] if len(v.shape) > 1 else 16),
                       v.dtype) for k, v in flat.items()})


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, *batch):
    return model.apply({"params": params}, *batch)


def _lm_batch():
    ids, mask, dec, dmask, labels = _batch()
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
            "decoder_attention_mask": dmask, "labels": labels}


def test_no_backbone_weight_or_activation_in_the_backward_pass(hf_and_ours, scanned):
    _, model, params = hf_and_ours
    assert backward_violations(model, METHOD, params, _lm_batch()) == []
    # Scanned backbone: the taps are the scan's outputs, the scan stays out of the backward
    # pass (its stacked weights [n, ...] are what a residual would equal).
    assert scanned[0].config.scan_layers
    assert backward_violations(scanned[0], METHOD, scanned[1], _lm_batch()) == []
    # The same check finds the backbone in Compacter++'s backward pass.
    cpp = peft.get_method("compacter++", reduction_factor=8)
    model = peft.build_model(model.config, cpp)
    params = _random_params(model)
    found = backward_violations(model, cpp, params, _lm_batch())
    assert any(v.startswith("weight encoder/block_0") for v in found), found
    assert any("d_ff" in v for v in found), found


def test_greedy_decoding_uses_the_side_cache(hf_and_ours):
    _, model, params = hf_and_ours
    params = _perturbed(params, seed=2)
    ids, mask, *_ = _batch()
    out = np.asarray(greedy_generate(model, params, ids, mask, max_new_tokens=4, eos_id=-1))
    # Teacher-forced on its own output, the model predicts the same tokens.
    dec = np.concatenate([np.zeros((2, 1), np.int32), out[:, :-1]], axis=1)
    logits = np.asarray(_apply(model, params, ids, mask, dec, np.ones_like(dec)))
    np.testing.assert_array_equal(out, logits.argmax(-1))


def test_validation_and_counts():
    from compacter_jax.models import get_preset
    tiny = get_preset("t5-tiny")
    with pytest.raises(ValueError, match="reduction_factor=3 does not divide"):
        peft.get_method("lst", reduction_factor=3).validate(tiny)
    with pytest.raises(ValueError, match="leave no valid side block"):
        peft.get_method("lst", side_layers=(5,)).validate(tiny)
    with pytest.raises(ValueError, match="side_init"):
        peft.get_method("lst", side_init="fisher")
    assert kept_layers(12, 4, ()) == (1, 2, 3, 5, 6, 7, 9, 10, 11)  # the paper's T5-base runs
    assert kept_layers(4, 0, ()) == (0, 1, 2, 3) and kept_layers(4, 2, (3, 1)) == (1, 3)


def test_export_and_load_adapter(tmp_path, backbone, hf_and_ours):
    _, model, params = hf_and_ours
    method = METHOD
    params = _perturbed(params)
    trainable, _ = method.partition(params)
    assert all(k[0].startswith("side_") for k in traverse_util.flatten_dict(trainable))
    peft.save_adapter(tmp_path / "a", trainable, method, model=backbone[1])
    loaded_model, loaded = peft.load_adapter(tmp_path / "a")
    ids, mask, dec, dmask, _ = _batch()
    np.testing.assert_array_equal(
        np.asarray(_apply(loaded_model, loaded, ids, mask, dec, dmask)),
        np.asarray(_apply(model, params, ids, mask, dec, dmask)))
    assert isinstance(loaded_model, T5ForConditionalGeneration)


def _train(model, method, params, strategy_name, devices, steps=2):
    from compacter_jax.train import TrainState, make_optimizer, make_strategy, make_train_step
    trainable, frozen = method.partition(params)
    tx, schedule = make_optimizer(1e-2, 0, steps)
    strategy = make_strategy(strategy_name, jax.devices()[:devices])
    step = strategy.compile_train_step(
        make_train_step(seq2seq_apply_fn(model), tx, merge_fn=method.combine,
                        schedule=schedule, per_example_dropout=True))
    state = strategy.replicate(TrainState.create(trainable, tx, 7))
    frozen = strategy.put_frozen(frozen)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, frozen, strategy.shard_batch(_lm_batch()))
        losses.append(float(strategy.unreplicate(metrics)["loss"]))
    return losses, strategy.unreplicate(state.params)


@pytest.mark.long  # ~60 s busy (three compiled train steps); packing/banks/export run by default
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (fake CPU) devices")
def test_pmap_and_mesh_train_like_one_device(hf_and_ours):
    _, model, params = hf_and_ours
    one = _train(model, METHOD, params, "jit", 1)
    assert one[0][1] < one[0][0]
    for name in ("pmap", "jit"):
        got = _train(model, METHOD, params, name, 2)
        np.testing.assert_allclose(got[0], one[0], rtol=1e-5, err_msg=name)
        for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(one[1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.long  # ~1 min busy: three tiny-T5 loads with a 32k vocabulary and their decoders
def test_serving_mixed_tasks_gives_each_adapters_tokens(tmp_path, files_source, tokenizer):
    from compacter_jax import data as data_lib
    from compacter_jax.serve import Predictor
    method = peft.get_method("lst", reduction_factor=4)
    _, params = peft.from_pretrained("random:t5-tiny", method, jax.random.PRNGKey(0))
    tasks, exports = ("rte", "cola"), {}
    for seed, task in enumerate(tasks):
        trainable = method.partition(_perturbed(params, seed=seed + 5))[0]
        exports[task] = peft.save_adapter(
            tmp_path / task, trainable, method, model="random:t5-tiny", task=task, step=1,
            init_seed=0, max_source_length=32, max_target_length=3,
            add_task_prefix=method.task_prefix)
    examples = [{"task": task, **ex} for task in tasks
                for ex in files_source.load(task, "validation")[:3]]
    got = Predictor("random:t5-tiny", exports, tokenizer=tokenizer, batch_size=4).generate(
        examples)
    for task in tasks:
        model, loaded = peft.load_adapter(exports[task])
        mine = [ex for ex in examples if ex["task"] == task]
        enc = data_lib.encode(task, mine, tokenizer, max_source_length=32, max_target_length=3,
                              add_prefix=method.task_prefix)
        want = np.asarray(greedy_generate(model, loaded, enc.input_ids, enc.attention_mask,
                                          max_new_tokens=3))
        mine_got = np.stack([t for t, ex in zip(got, examples) if ex["task"] == task])
        np.testing.assert_array_equal(mine_got[:, :3], want, err_msg=task)


def test_fisher_importance_drives_the_pruning(hf_and_ours):
    from compacter_jax.peft.methods.lst import fisher_importance, init_side_from_backbone
    _, model, params = hf_and_ours
    # The squared gradients summed over batches, against the analytic gradient of
    # (w . x)^2: 2 (w . x) x.
    w = {"w": jnp.asarray([0.5, -1.0, 2.0])}
    xs = [np.asarray([1.0, 2.0, 3.0]), np.asarray([-1.0, 0.5, 0.0])]
    fisher = fisher_importance(lambda p, x: jnp.dot(p["w"], x) ** 2, w, xs)
    want = sum((2 * np.dot(np.asarray(w["w"]), x) * x) ** 2 for x in xs)
    np.testing.assert_allclose(np.asarray(fisher["w"]), want, rtol=1e-6)
    # Scores equal to the weights reproduce the default (magnitude) initialisation ...
    same = init_side_from_backbone(params, model.config, METHOD, importance=params)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... and other scores pick other units: the embedding's last 8 columns score highest,
    # every other weight ties (ties keep the lowest indices). With side block 0 = backbone
    # block 0 (same shapes as METHOD's one kept block), its inputs are columns 24..31.
    imp = jax.tree_util.tree_map(lambda x: np.ones(x.shape, np.float32), params)
    imp["shared"]["embedding"] = np.tile(np.arange(32, dtype=np.float32), (64, 1))
    other = init_side_from_backbone(params, model.config, METHOD.replace(side_layers=(0,)),
                                    importance=imp)
    side = other["side_encoder"]["stack"]["block_0"]["layer_0"]
    blk = params["encoder"]["block_0"]["layer_0"]
    np.testing.assert_array_equal(np.asarray(side["layer_norm"]["scale"]),
                                  np.asarray(blk["layer_norm"]["scale"])[24:])
    np.testing.assert_array_equal(np.asarray(side["SelfAttention"]["q"]["kernel"]),
                                  np.asarray(blk["SelfAttention"]["q"]["kernel"])[24:, :8])


# --- a scanned backbone ----------------------------------------------------------------------
def _flat_side(params):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()
            if k[0].startswith("side_")}


def test_scanned_backbone_gives_the_same_side_init(hf_and_ours, scanned):
    """The side network pruned from a scanned backbone (`prune_stack` reading `blocks/...[i]`)
    is the one pruned from the unscanned backbone, bit for bit, with importance scores too."""
    from compacter_jax.peft.methods.lst import init_side_from_backbone
    _, model, params = hf_and_ours
    moved = _perturbed(params)  # side leaves away from the pruned init
    want = _flat_side(METHOD.prepare(moved, model.config))
    got = _flat_side(METHOD.prepare(stack_blocks(moved), scanned[0].config))
    before, init = _flat_side(moved), _flat_side(params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    # Side blocks, norms and position biases came back to the pruned init; the ladders and
    # projections (not pruned) kept their values.
    pruned = [k for k in want if k[2].startswith(("block_", "final_layer_norm", "relative"))]
    assert pruned and all(np.array_equal(want[k], init[k]) for k in pruned)
    assert all(np.array_equal(want[k], before[k]) for k in want if k not in pruned)
    # Importance scores (here not the weights' magnitude), stacked alike: the same again.
    imp = jax.tree_util.tree_map(lambda x: np.abs(np.asarray(x)) ** 0.5 + 0.1 * np.cos(
        np.arange(x.size, dtype=np.float32).reshape(x.shape)), params)
    a = _flat_side(init_side_from_backbone(params, model.config, METHOD, imp))
    b = _flat_side(init_side_from_backbone(stack_blocks(params), scanned[0].config, METHOD,
                                           stack_blocks(imp)))
    assert any(not np.array_equal(a[k], init[k]) for k in pruned)
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=str(k))


@functools.partial(jax.jit, static_argnums=0)
def _logits_loss_and_grad(model, params, batch):
    trainable, frozen = METHOD.partition(params)
    apply_fn = seq2seq_apply_fn(model)

    def loss(trainable):
        logits = apply_fn(METHOD.combine(trainable, frozen), batch, True, None)
        return token_loss_sum(logits, batch["labels"], batch["decoder_attention_mask"])[0], logits
    (value, logits), grad = jax.value_and_grad(loss, has_aux=True)(trainable)
    return logits, value, grad


def test_scanned_backbone_gives_the_same_logits_and_gradients(hf_and_ours, scanned):
    _, model, params = hf_and_ours
    params = _perturbed(params)
    batch = _lm_batch()
    l0, v0, g0 = _logits_loss_and_grad(model, params, batch)
    l1, v1, g1 = _logits_loss_and_grad(scanned[0], stack_blocks(params), batch)
    # One float32 program vs another of the same arithmetic (a loop vs a scan): reordered
    # sums over at most d_ff = 48 terms, a few eps32 * sqrt(48) of the values' scale.
    close = 4 * float(np.finfo(np.float32).eps) * np.sqrt(HF["d_ff"])
    l0, l1 = np.asarray(l0), np.asarray(l1)
    assert np.abs(l0).max() > 0.1
    np.testing.assert_allclose(l1, l0, rtol=0, atol=close * np.abs(l0).max())
    np.testing.assert_allclose(float(v1), float(v0), rtol=close)
    g0, g1 = traverse_util.flatten_dict(g0), traverse_util.flatten_dict(g1)
    assert sorted(g0) == sorted(g1) and all(k[0].startswith("side_") for k in g0)
    # Every leaf's error comes from the same backward signals: the largest |g| sets the scale.
    atol = close * max(float(np.abs(g).max()) for g in g0.values())
    assert atol > 0
    for k in g0:
        np.testing.assert_allclose(np.asarray(g1[k]), np.asarray(g0[k]), rtol=0, atol=atol,
                                   err_msg=str(k))


@pytest.mark.long  # a second compiled init (~5 s busy)
def test_from_pretrained_scanned_is_the_unscanned_stacked(backbone, hf_and_ours):
    """Loading with scan_layers=True: the backbone stacked, the side network (pruned and
    fresh leaves) identical."""
    model, params = peft.from_pretrained(backbone[1], METHOD, jax.random.PRNGKey(3),
                                         scan_layers=True)
    assert model.config.scan_layers
    want = traverse_util.flatten_dict(stack_blocks(hf_and_ours[2]))
    got = traverse_util.flatten_dict(params)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=str(k))


@pytest.mark.long  # two compiled greedy decoders (~10 s busy)
def test_scanned_backbone_decodes_like_unscanned(hf_and_ours, scanned):
    """Greedy decoding with the KV cache (the scanned backbone's cache stacked per block)."""
    _, model, params = hf_and_ours
    params = _perturbed(params, seed=2)
    ids, mask, *_ = _batch()
    want = np.asarray(greedy_generate(model, params, ids, mask, max_new_tokens=4, eos_id=-1))
    got = np.asarray(greedy_generate(scanned[0], stack_blocks(params), ids, mask,
                                     max_new_tokens=4, eos_id=-1))
    np.testing.assert_array_equal(got, want)
