"""Span corruption (compacter_jax.data.span_corruption) and the pretraining corpus
(compacter_jax.data.corpus), the latter on the real GLUE/SuperGLUE files."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from compacter_jax.data import DataState, make_source, paper_splits
from compacter_jax.data import corpus as corpus_lib
from compacter_jax.data.span_corruption import (
    FIRST_SENTINEL_ID, SpanCorruption, corrupt_rows, eval_batches,
    noise_span_to_unique_sentinel, nonnoise_span_to_unique_sentinel, pretraining_batches,
    random_spans_helper, random_spans_noise_mask)

SENTINEL_FLOOR = FIRST_SENTINEL_ID - 99  # <extra_id_99> = 32000


def reassemble(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Independent inverse: each input sentinel is replaced by the target tokens that follow
    the same sentinel in the targets (up to the next sentinel or EOS)."""
    assert inputs[-1] == 1 and targets[-1] == 1, "inputs and targets must end with EOS"
    spans, current = {}, None
    for tok in targets[:-1].tolist():
        if tok >= SENTINEL_FLOOR:
            current = tok
            spans[current] = []
        else:
            assert current is not None, "targets must start with a sentinel"
            spans[current].append(tok)
    out = []
    for tok in inputs[:-1].tolist():
        out.extend(spans[tok] if tok >= SENTINEL_FLOOR else [tok])
    return out


# ------------------------------------------------------------------- the objective


def test_random_spans_helper_gives_t5s_published_lengths():
    # T5 (Raffel et al.; t5.data) pretrains with inputs 512 -> 568 raw tokens, targets 114.
    assert random_spans_helper(512, 0.15, 3.0, 1, 1) == (568, 114)
    tokens, targets = random_spans_helper(128)
    assert (tokens, targets) == (141, 29)
    # The chunk is the longest that fits: one more raw token would overflow the inputs.
    noise = round(0.15 * (tokens + 1))
    assert (tokens + 1) - noise + round(noise / 3) + 1 > 128


def test_first_sentinel_id_is_read_from_the_tokenizer(tokenizer):
    from compacter_jax.data.span_corruption import first_sentinel_id

    assert first_sentinel_id(tokenizer) == FIRST_SENTINEL_ID == len(tokenizer) - 1

    class NoSentinels:  # e.g. a BERT-style vocabulary: every <extra_id_k> is unk
        unk_token_id = 100

        def convert_tokens_to_ids(self, token):
            return 100

    with pytest.raises(ValueError, match="sentinels"):
        first_sentinel_id(NoSentinels())


def test_sentinels_replace_spans_as_in_the_t5_paper():
    # "Thank you [for inviting] me to your party [last] week ." (Raffel et al., Fig. 2)
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0], bool)
    s0, s1, s2 = FIRST_SENTINEL_ID, FIRST_SENTINEL_ID - 1, FIRST_SENTINEL_ID - 2
    assert noise_span_to_unique_sentinel(tokens, mask).tolist() == [
        10, 11, s0, 14, 15, 16, 17, s1, 19, 20]
    assert nonnoise_span_to_unique_sentinel(tokens, mask).tolist() == [
        s0, 12, 13, s1, 18, s2]


@pytest.mark.parametrize("length", [1, 2, 3, 7, 20, 141, 568, 1000])
def test_inputs_and_targets_reassemble_into_the_original(length):
    spec = SpanCorruption()
    for seed in range(25):
        rng = np.random.default_rng([length, seed])
        tokens = rng.integers(2, 32000, length).astype(np.int32)
        inputs, targets = spec.corrupt(tokens, rng)
        assert inputs.dtype == np.int32 and targets.dtype == np.int32
        assert reassemble(inputs, targets) == tokens.tolist()
        # sentinels count down from <extra_id_0>, in the same order on both sides
        in_sent = inputs[inputs >= SENTINEL_FLOOR].tolist()
        tgt_sent = targets[targets >= SENTINEL_FLOOR].tolist()
        assert in_sent == list(range(FIRST_SENTINEL_ID, FIRST_SENTINEL_ID - len(in_sent), -1))
        assert tgt_sent[:len(in_sent)] == in_sent
        assert targets[0] == FIRST_SENTINEL_ID


def test_chunk_of_tokens_length_fills_inputs_and_targets_exactly():
    spec = SpanCorruption(inputs_length=128)
    rng = np.random.default_rng(0)
    for _ in range(50):
        inputs, targets = spec.corrupt(rng.integers(2, 32000, spec.tokens_length), rng)
        assert (len(inputs), len(targets)) == (128, spec.targets_length) == (128, 29)


def test_noise_density_and_span_lengths_on_a_large_sample():
    length, density, mean_span = 1000, 0.15, 3.0
    num_noise, num_spans = 150, 50
    rng = np.random.default_rng(1)
    noise_freq = np.zeros(length)
    span_lengths, gaps = [], []
    for _ in range(400):
        mask = random_spans_noise_mask(length, density, mean_span, rng)
        noise_freq += mask
        assert mask.sum() == num_noise
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        starts, ends = edges[::2], edges[1::2]
        assert len(starts) == num_spans
        span_lengths.extend(ends - starts)
        gaps.extend(starts[1:] - ends[:-1])
    noise_freq /= 400
    assert abs(noise_freq.mean() - density) < 1e-9
    assert np.mean(span_lengths) == pytest.approx(mean_span)
    # Spans start after a non-noise span and the mask ends in noise (the original's layout).
    assert noise_freq[0] == 0.0 and noise_freq[-1] == 1.0
    # Uniform over the interior positions: every position near the density.
    assert np.all(np.abs(noise_freq[20:-20] - density) < 0.08)
    assert abs(noise_freq[20:-20].mean() - density) < 0.01
    # All compositions equally likely -> P(span length = j) = C(N-j-1, k-2) / C(N-1, k-1).
    hist = np.bincount(span_lengths, minlength=12)[1:12] / len(span_lengths)
    theory = [math.comb(num_noise - j - 1, num_spans - 2) / math.comb(num_noise - 1, num_spans - 1)
              for j in range(1, 12)]
    np.testing.assert_allclose(hist, theory, atol=0.02)
    # Non-noise runs between spans: 850 tokens in 50 exchangeable runs, 17 on average.
    assert np.mean(gaps) == pytest.approx((length - num_noise) / num_spans, rel=0.05)


def test_degenerate_lengths_follow_the_original():
    rng = np.random.default_rng(0)
    assert random_spans_noise_mask(1, 0.15, 3.0, rng).tolist() == [False]  # built for 2, cut
    assert random_spans_noise_mask(2, 0.15, 3.0, rng).tolist() == [False, True]
    assert not random_spans_noise_mask(5, 0.0, 3.0, rng).any()
    with pytest.raises(ValueError, match="noise_density"):
        random_spans_noise_mask(10, 1.5, 3.0, rng)
    with pytest.raises(ValueError, match="sentinels"):
        SpanCorruption(inputs_length=4096)  # ~100+ spans: more than T5's 100 sentinels


def test_corrupt_rows_depends_on_seed_epoch_and_row_only():
    spec = SpanCorruption(inputs_length=32)
    chunks = np.random.default_rng(0).integers(2, 32000, (10, spec.tokens_length)).astype(
        np.int32)
    a = corrupt_rows(chunks, np.array([3, 7]), spec, seed=5, epoch=1)
    b = corrupt_rows(chunks, np.array([7, 0, 3]), spec, seed=5, epoch=1)
    np.testing.assert_array_equal(a["input_ids"][0], b["input_ids"][2])
    np.testing.assert_array_equal(a["labels"][1], b["labels"][0])
    c = corrupt_rows(chunks, np.array([3, 7]), spec, seed=5, epoch=2)
    assert not np.array_equal(a["input_ids"], c["input_ids"])  # a new epoch, new masks
    np.testing.assert_array_equal(a["decoder_input_ids"][:, 0], 0)
    np.testing.assert_array_equal(a["decoder_input_ids"][:, 1:], a["labels"][:, :-1])
    assert a["attention_mask"].all() and a["decoder_attention_mask"].all()
    with pytest.raises(ValueError, match="tokens_length"):
        corrupt_rows(chunks[:, :10], np.array([0]), spec, seed=0, epoch=0)


def test_pretraining_batches_resume_where_they_stopped():
    spec = SpanCorruption(inputs_length=32)
    chunks = np.random.default_rng(0).integers(2, 32000, (11, spec.tokens_length)).astype(
        np.int32)
    it = pretraining_batches(chunks, 4, spec, seed=3)  # 2 batches per epoch
    run = [next(it) for _ in range(5)]
    assert [s for _, s in run] == [DataState(0, 1), DataState(1, 0), DataState(1, 1),
                                   DataState(2, 0), DataState(2, 1)]
    resumed = pretraining_batches(chunks, 4, spec, seed=3, state=run[1][1])
    for (want, _), (got, _) in zip(run[2:], [next(resumed) for _ in range(3)]):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
    seen = np.concatenate([b["input_ids"] for b, _ in run[:2]])
    assert len({tuple(r) for r in seen}) == 8  # an epoch draws distinct chunks


def test_eval_batches_cover_every_chunk_once_with_a_fixed_corruption():
    spec = SpanCorruption(inputs_length=32)
    chunks = np.random.default_rng(0).integers(2, 32000, (5, spec.tokens_length)).astype(
        np.int32)
    batches = list(eval_batches(chunks, 2, spec, seed=9))
    assert [b["example_mask"].tolist() for b in batches] == [[1, 1], [1, 1], [1, 0]]
    again = list(eval_batches(chunks, 5, spec, seed=9))[0]
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches])[:5],
                                  again["labels"])


# --------------------------------------------------------------------------- corpus


def test_concat_and_chunk_joins_documents_with_eos():
    docs = [[5, 6], [7], [8, 9, 10]]  # stream: 5 6 1 7 1 8 9 10 1
    assert corpus_lib.concat_and_chunk(docs, 3, eos_id=1).tolist() == [
        [5, 6, 1], [7, 1, 8], [9, 10, 1]]
    chunks = corpus_lib.concat_and_chunk(docs, 4, eos_id=1)  # the final partial row is dropped
    assert chunks.tolist() == [[5, 6, 1, 7], [1, 8, 9, 10]] and chunks.dtype == np.int32


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@pytest.fixture(scope="module")
def documents(shared_data):
    return corpus_lib.corpus_documents(make_source("files", data_dir=shared_data))


def _paper_eval_fields(shared_data, tasks):
    """Every text field of the paper's validation and test examples, read independently."""
    source = make_source("files", data_dir=shared_data)
    out = []
    for name in tasks:
        splits = paper_splits(name, source, data_seed=42)
        for split in ("validation", "test"):
            for ex in splits[split]:
                out.extend(str(ex[f]) for f in corpus_lib.document_fields(name)
                           if isinstance(ex.get(f), str))
    return out


def test_corpus_holds_no_validation_or_test_text(documents, shared_data):
    # Every locally available task with a training split feeds the corpus.
    assert set(documents.tasks) == {"cola", "sst2", "mrpc", "stsb", "rte", "wnli", "cb", "copa"}
    evaluation = _paper_eval_fields(shared_data, documents.tasks)
    assert len(evaluation) > 7000
    corpus_fields = {_norm(f) for doc in documents.fields for f in doc}
    equal = [t for t in evaluation if _norm(t) in corpus_fields]
    assert not equal, equal[:5]
    # Long evaluation texts do not occur anywhere inside the corpus text either.
    # (Index the corpus by the 32 characters from each word start; a hit is then confirmed
    # by a plain substring search, which alone would take ~10 s here.)
    haystack = "\n".join(_norm(t) for t in documents.texts)
    starts = [0] + [m.end() for m in re.finditer(r"[ \n]", haystack)]
    windows = {haystack[i:i + 32] for i in starts}
    long_texts = {_norm(t) for t in evaluation if len(t.split()) >= corpus_lib.CONTAMINATION_NGRAM}
    assert len(long_texts) > 1000
    inside = [t for t in long_texts if t[:32] in windows and t in haystack]
    assert not inside, inside[:3]
    # The raw material had such overlaps (else the test above would prove nothing).
    stats = documents.stats["per_task"]
    assert stats["stsb"]["contaminated"] > 100 and stats["sst2"]["contaminated"] > 100


def test_sst2_paper_validation_rows_stay_out(documents, shared_data):
    # SST-2's paper validation set is 1,000 rows of the official *train* file.
    val = paper_splits("sst2", make_source("files", data_dir=shared_data))["validation"]
    texts = {_norm(t) for t, task in zip(documents.texts, documents.task_of) if task == "sst2"}
    assert not [ex["sentence"] for ex in val if _norm(ex["sentence"]) in texts]


def test_heldout_documents_are_disjoint_from_training_documents(documents):
    n = len(documents.fields) - documents.num_heldout
    assert documents.num_heldout == round(0.01 * (n + documents.num_heldout
                                                  + documents.stats["total_heldout_overlap"]))
    heldout = {_norm(f) for doc in documents.fields[n:] for f in doc}
    assert not [f for doc in documents.fields[:n] for f in doc if _norm(f) in heldout]
    assert len(set(documents.task_of[n:])) >= 5  # a mixed sample, not one task's tail


def test_corpus_is_deterministic_and_tokenised_with_eos(t5_vocab, shared_data):
    from compacter_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(t5_vocab)
    source = make_source("files", data_dir=shared_data)
    corpus = corpus_lib.pretraining_corpus(source, ["cb"], tokenizer=tok, chunk_length=50,
                                           heldout_fraction=0.05)
    again = corpus_lib.pretraining_corpus(source, ["cb"], tokenizer=tok, chunk_length=50,
                                          heldout_fraction=0.05)
    np.testing.assert_array_equal(corpus.train_chunks, again.train_chunks)
    assert corpus.heldout_fingerprint() == again.heldout_fingerprint()
    stream = []
    for text in corpus.documents.train_texts:
        stream += tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    n = len(stream) // 50
    assert corpus.train_chunks.shape == (n, 50) and corpus.train_chunks.dtype == np.int32
    np.testing.assert_array_equal(corpus.train_chunks.reshape(-1), stream[:n * 50])
    summary = corpus.summary()
    assert summary["tasks"] == ["cb"] and summary["train_tokens"] == n * 50
    assert len(summary["heldout_sha256"]) == 64


@pytest.mark.parametrize("density", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_a_noise_density_outside_0_1_is_refused_not_searched_forever(density):
    """Issue 19: density 1.5 made `random_spans_helper`'s length search loop forever."""
    with pytest.raises(ValueError, match=r"noise_density must be in \(0, 1\)"):
        random_spans_helper(128, density)
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruption(inputs_length=32, noise_density=density)


def test_a_span_length_below_one_is_refused():
    with pytest.raises(ValueError, match="mean_noise_span_length must be >= 1"):
        random_spans_helper(128, 0.15, 0.0)
