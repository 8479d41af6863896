"""Packed (t5x-style) rows: every example of a packed row computes what it computes alone.

Reference: the same examples unpacked, one per row of a padded batch (the path that matches
HF PyTorch T5, tests/models/test_t5_hf_parity.py). Packed rows put several examples in one row
with segment ids and per-segment positions; their logits must equal the reference (within
float32 rounding: 4 eps32 sqrt(d_ff) of the logits' scale).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from t5_reference import fast_jit, random_params

from compacter_jax import peft
from compacter_jax.models import (T5Config, T5ForConditionalGeneration, init_params,
                                  shift_right, stack_blocks)
from compacter_jax.models.t5 import segment_mask


def peft_methods_under_test() -> dict[str, peft.Method]:
    """Every packable preset (adapters, LoRA, BitFit, full), sized for the tiny PEFT model
    (d_model 48, 2 encoder blocks)."""
    tiny = {"reduction_factor": 4}  # bottleneck 12: n = 4 and n = 12 (phm_adapter) divide it
    methods = {name: peft.get_method(name, **tiny) if isinstance(m, peft.AdapterMethod) else m
               for name, m in peft.PRESETS.items() if m.packable}
    methods["adapterdrop"] = peft.get_method("adapterdrop", drop_first=1, **tiny)
    methods["lst"] = peft.get_method("lst", reduction_factor=4, drop_every=0)
    return methods


V10 = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=20)  # relu, tied, scaled decoder outputs
V11 = V10.replace(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                  scale_decoder_outputs=False)
# One decoder block keeps the nine compiles cheap; two encoder blocks let adapterdrop differ.
PEFT_T5 = V11.replace(d_model=48, d_kv=12, d_ff=64, num_decoder_layers=1)

SRC, TGT = 24, 12  # packed row lengths
# (source length, target length) of each example: very different lengths, some beyond the
# relative-position max_distance (20).
EXAMPLES = [(24, 12), (3, 1), (13, 6), (5, 3), (1, 2), (23, 10), (7, 4)]
ROWS = [[0],        # one example filling the whole row
        [1, 2, 3],  # three segments, trailing padding
        [4, 5],     # two segments, encoder row exactly full
        [6]]        # one short segment, mostly padding


def _tokens(seed: int = 0):
    rng = np.random.RandomState(seed)
    return [(rng.randint(2, 64, s).astype(np.int32), rng.randint(2, 64, t).astype(np.int32))
            for s, t in EXAMPLES]


def _pack(tokens, rows):
    """Packed numpy arrays of `rows` and, per example, (row, decoder offset)."""
    b = len(rows)
    arr = {k: np.zeros((b, SRC), np.int32) for k in ("input_ids", "enc_seg", "enc_pos")}
    arr |= {k: np.zeros((b, TGT), np.int32) for k in ("labels", "dec_seg", "dec_pos")}
    spans = {}
    for r, members in enumerate(rows):
        e = d = 0
        for seg, i in enumerate(members, start=1):
            src, tgt = tokens[i]
            arr["input_ids"][r, e:e + len(src)] = src
            arr["enc_seg"][r, e:e + len(src)] = seg
            arr["enc_pos"][r, e:e + len(src)] = np.arange(len(src))
            arr["labels"][r, d:d + len(tgt)] = tgt
            arr["dec_seg"][r, d:d + len(tgt)] = seg
            arr["dec_pos"][r, d:d + len(tgt)] = np.arange(len(tgt))
            spans[i] = (r, d)
            e, d = e + len(src), d + len(tgt)
        assert e <= SRC and d <= TGT
    arr["decoder_input_ids"] = shift_right(arr["labels"], segment_ids=arr["dec_seg"])
    return arr, spans


def _alone(tokens):
    """Each example alone in its own row of a right-padded, unpacked batch."""
    n = len(tokens)
    ids, mask = np.zeros((n, SRC), np.int32), np.zeros((n, SRC), np.int32)
    labels, dmask = np.zeros((n, TGT), np.int32), np.zeros((n, TGT), np.int32)
    for i, (src, tgt) in enumerate(tokens):
        ids[i, :len(src)], mask[i, :len(src)] = src, 1
        labels[i, :len(tgt)], dmask[i, :len(tgt)] = tgt, 1
    return ids, mask, shift_right(labels), dmask


def _packed_kwargs(arr, positions: bool = True) -> dict:
    kw = dict(encoder_segment_ids=arr["enc_seg"], decoder_segment_ids=arr["dec_seg"])
    if positions:
        kw |= dict(encoder_positions=arr["enc_pos"], decoder_positions=arr["dec_pos"])
    return kw


@fast_jit(static_argnums=(0, 4))
def _packed_and_alone(model, params, arr, alone, without_positions=False):
    """(packed logits, unpacked logits) and, if asked, packed logits without positions (and
    with a decoder mask instead of None): one compile per model."""
    v = {"params": params}
    enc_mask = (arr["enc_seg"] > 0).astype(jnp.int32)
    packed = model.apply(v, arr["input_ids"], enc_mask, arr["decoder_input_ids"], None,
                         **_packed_kwargs(arr))
    out = (packed, model.apply(v, *alone))
    if without_positions:
        dec_mask = (arr["dec_seg"] > 0).astype(jnp.int32)
        out += (model.apply(v, arr["input_ids"], enc_mask, arr["decoder_input_ids"], dec_mask,
                            **_packed_kwargs(arr, positions=False)),)
    return out


def _atol(want) -> float:
    """Packed and alone are the same float32 arithmetic with sums reordered (other shapes; the
    masked terms are exact zeros) over at most d_ff (<= 64) terms: a few eps32 * sqrt(64) of
    the logits' largest magnitude."""
    return 4 * float(np.finfo(np.float32).eps) * np.sqrt(64) * float(np.abs(want).max())


def _assert_each_example_equal(packed, alone, spans):
    packed, alone = np.asarray(packed), np.asarray(alone)
    atol = _atol(alone)
    for i, (r, d) in spans.items():
        t = EXAMPLES[i][1]
        np.testing.assert_allclose(packed[r, d:d + t], alone[i, :t], atol=atol, rtol=0,
                                   err_msg=f"example {i} (row {r}, offset {d})")


@pytest.fixture(scope="module")
def data():
    tokens = _tokens()
    arr, spans = _pack(tokens, ROWS)
    return arr, spans, _alone(tokens)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("cfg", [V10, V11], ids=["v1.0", "v1.1"])
def test_packed_logits_equal_each_example_alone(data, cfg, scan):
    arr, spans, alone = data
    params = random_params(T5ForConditionalGeneration(cfg))
    if scan:
        cfg, params = cfg.replace(scan_layers=True), stack_blocks(params)
    packed, ref, *no_pos = _packed_and_alone(T5ForConditionalGeneration(cfg), params, arr,
                                             alone, not scan)
    _assert_each_example_equal(packed, ref, spans)
    if no_pos:  # contiguous segments: row indices give the same distances as positions
        _assert_each_example_equal(no_pos[0], ref, spans)
    # Padding (segment 0) attends to nothing, yet its rows stay finite.
    assert np.isfinite(np.asarray(packed)).all()
    assert (arr["dec_seg"] == 0).any() and (arr["enc_seg"] == 0).any()


def test_positions_define_relative_distances():
    """A segment with positions 0, 2, 4, ... equals the example with masked gaps between its
    tokens (so the bias really comes from positions, not from row indices)."""
    cfg = V11
    params = random_params(T5ForConditionalGeneration(cfg))
    rng = np.random.RandomState(1)
    ls, lt = 11, 6
    src, dec_in = rng.randint(2, 64, ls).astype(np.int32), rng.randint(2, 64, lt).astype(np.int32)
    # packed row: [other example (4 src, 3 tgt) | this example with stretched positions | pad]
    arr = {k: np.zeros((1, SRC), np.int32) for k in ("input_ids", "enc_seg", "enc_pos")}
    arr |= {k: np.zeros((1, TGT), np.int32) for k in ("decoder_input_ids", "dec_seg", "dec_pos")}
    arr["input_ids"][0, :4], arr["enc_seg"][0, :4], arr["enc_pos"][0, :4] = 7, 1, np.arange(4)
    arr["decoder_input_ids"][0, :3], arr["dec_seg"][0, :3], arr["dec_pos"][0, :3] = 9, 1, \
        np.arange(3)
    arr["input_ids"][0, 4:4 + ls], arr["enc_seg"][0, 4:4 + ls] = src, 2
    arr["enc_pos"][0, 4:4 + ls] = 2 * np.arange(ls)
    arr["decoder_input_ids"][0, 3:3 + lt], arr["dec_seg"][0, 3:3 + lt] = dec_in, 2
    arr["dec_pos"][0, 3:3 + lt] = 2 * np.arange(lt)
    # reference: the example unpacked, its tokens at indices 0, 2, 4, ... and masked gaps
    ids, mask = np.zeros((1, 2 * ls - 1), np.int32), np.zeros((1, 2 * ls - 1), np.int32)
    ids[0, ::2], mask[0, ::2] = src, 1
    dec, dmask = np.zeros((1, 2 * lt - 1), np.int32), np.zeros((1, 2 * lt - 1), np.int32)
    dec[0, ::2], dmask[0, ::2] = dec_in, 1

    @fast_jit
    def run(params):
        model = T5ForConditionalGeneration(cfg)
        v = {"params": params}
        return (model.apply(v, arr["input_ids"], arr["enc_seg"] > 0, arr["decoder_input_ids"],
                            **_packed_kwargs(arr)),
                model.apply(v, ids, mask, dec, dmask))

    packed, ref = run(params)
    np.testing.assert_allclose(packed[0, 3:3 + lt], ref[0, ::2], atol=_atol(ref), rtol=0)


@pytest.fixture(scope="module")
def backbone_leaves():
    plain = T5ForConditionalGeneration(PEFT_T5)
    return len(jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: init_params(plain, jax.random.PRNGKey(0)))))


@pytest.mark.parametrize("name", sorted(peft_methods_under_test()))
def test_packed_equals_alone_with_peft_hooks(data, backbone_leaves, name):
    arr, spans, alone = data
    method = peft_methods_under_test()[name]
    model = T5ForConditionalGeneration(PEFT_T5, method.hooks())
    params = random_params(model)  # PEFT leaves random too, so every hook changes the output
    # Full fine-tuning and Intrinsic-SAID reparameterise the backbone's own leaves (no hooks).
    assert len(jax.tree_util.tree_leaves(params)) > backbone_leaves or isinstance(
        method, (peft.FullFineTuning, peft.IntrinsicSAID)), f"{name} inserted nothing into the model"
    packed, ref = _packed_and_alone(model, params, arr, alone)
    _assert_each_example_equal(packed, ref, spans)


def test_prompt_tuning_refuses_packed_inputs(data):
    arr, _, _ = data
    model = T5ForConditionalGeneration(
        V10, peft.get_method("prompt_tuning", length=3).hooks())
    with pytest.raises(ValueError, match="prompt tuning does not support packed inputs; set "
                                         "packing off"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), arr["input_ids"],
                                          arr["enc_seg"] > 0, arr["decoder_input_ids"],
                                          **_packed_kwargs(arr)))


def test_bad_packing_arguments_raise_clear_errors(data):
    arr, _, _ = data
    model = T5ForConditionalGeneration(V10)
    ids, dec = arr["input_ids"], arr["decoder_input_ids"]

    def init(*args, method=None, **kw):
        return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, method=method,
                                                 **kw))

    with pytest.raises(ValueError, match="encoder_positions has shape"):
        init(ids, None, dec, encoder_positions=arr["enc_pos"][:, :-1])
    with pytest.raises(ValueError, match="decoder_segment_ids has shape"):
        init(ids, None, dec, encoder_segment_ids=arr["enc_seg"],
             decoder_segment_ids=arr["dec_seg"][:1])
    with pytest.raises(ValueError, match="only encoder_segment_ids given"):
        init(ids, None, dec, encoder_segment_ids=arr["enc_seg"])
    with pytest.raises(ValueError, match="only decoder_segment_ids given"):
        init(ids, None, dec, decoder_segment_ids=arr["dec_seg"])
    hidden = jnp.zeros(ids.shape + (V10.d_model,))
    with pytest.raises(ValueError, match="KV cache"):
        init(dec, hidden, None, encoder_segment_ids=arr["enc_seg"],
             decoder_segment_ids=arr["dec_seg"], decode=True, method=model.decode)
    with pytest.raises(ValueError, match="encoder_segment_ids has shape"):
        init(dec, hidden[:, :-1], None, encoder_segment_ids=arr["enc_seg"],
             decoder_segment_ids=arr["dec_seg"], method=model.decode)


def test_segment_mask_matches_loop():
    """Same segment and both not padding: padding attends to nothing, is attended by nothing."""
    rng = np.random.RandomState(2)
    q, k = _random_segments(rng, 5, 7), _random_segments(rng, 5, 9)
    want = np.array([[[q[b, i] == k[b, j] != 0 for j in range(9)] for i in range(7)]
                     for b in range(5)])[:, None]
    got = segment_mask(q, k)
    assert got.shape == (5, 1, 7, 9) and got.dtype == jnp.bool_
    np.testing.assert_array_equal(got, want)
    assert (q == 0).any() and (k == 0).any()


# --- shift_right ---------------------------------------------------------------------------
def _shift_right_loop(labels, start, segments):
    """Reference: a python loop over every token."""
    out = np.zeros_like(labels)
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1]):
            if segments is not None and segments[b, i] == 0:
                out[b, i] = 0
            elif i == 0 or (segments is not None and segments[b, i] != segments[b, i - 1]):
                out[b, i] = start
            else:
                out[b, i] = labels[b, i - 1]
    return out


def _random_segments(rng, batch, length):
    seg = np.zeros((batch, length), np.int32)
    for b in range(batch):
        i, s = 0, 1
        end = rng.randint(0, length + 1)  # trailing padding from `end`
        while i < end:
            n = rng.randint(1, 5)
            seg[b, i:min(i + n, end)] = s
            i, s = i + n, s + 1
    return seg


@pytest.mark.parametrize("start", [0, 5])
def test_shift_right_within_segments_matches_loop(start):
    rng = np.random.RandomState(0)
    labels = rng.randint(1, 50, (6, 13)).astype(np.int64)
    segments = _random_segments(rng, 6, 13)
    segments[0] = 1  # one segment fills a row
    labels[segments == 0] = 0
    want = _shift_right_loop(labels, start, segments)
    got = shift_right(labels, start, segments)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    got_jax = shift_right(jnp.asarray(labels, jnp.int32), start, jnp.asarray(segments))
    assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got_jax), want)
    jitted = jax.jit(lambda x, s: shift_right(x, start, segment_ids=s))
    np.testing.assert_array_equal(jitted(jnp.asarray(labels, jnp.int32), segments), want)
    traced_segments = jax.jit(lambda s: shift_right(labels, start, segment_ids=s))
    np.testing.assert_array_equal(traced_segments(segments), want)
    # seqio's documented example
    np.testing.assert_array_equal(
        shift_right(np.array([[3, 8, 1, 9, 1, 5, 4, 1, 0, 0]]),
                    segment_ids=np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0]])),
        [[0, 3, 8, 0, 9, 0, 5, 4, 0, 0]])


def test_shift_right_unpacked_and_errors():
    labels = np.array([[209, 1, 0, 0], [632, 3, 1, 0]], np.int32)
    np.testing.assert_array_equal(shift_right(labels), [[0, 209, 1, 0], [0, 632, 3, 1]])
    np.testing.assert_array_equal(shift_right(labels), _shift_right_loop(labels, 0, None))
    got = shift_right(jnp.asarray(labels), 7)
    assert isinstance(got, jax.Array) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, [[7, 209, 1, 0], [7, 632, 3, 1]])
    assert shift_right(labels).dtype == np.int32
    with pytest.raises(ValueError, match="segment_ids has shape"):
        shift_right(labels, segment_ids=np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match=r"labels must be \[batch, len\]"):
        shift_right(np.array([1, 2, 3]))
