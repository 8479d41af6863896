"""The span-corruption / full-sequence denoising mixture (compacter_jax.data.denoising)."""

from __future__ import annotations

import numpy as np
import pytest

from compacter_jax.data.pipeline import epoch_permutation
from compacter_jax.data.denoising import (denoise, denoise_eval_batches, denoise_rows,
                                          is_denoise_batch, mixture_batches)
from compacter_jax.data.span_corruption import (SpanCorruption, pretraining_batches,
                                                random_spans_noise_mask)

SPEC = SpanCorruption(inputs_length=32, first_sentinel_id=8099)


def explicit_denoise(tokens, mask, first_sentinel):
    """Written out token by token: a sentinel (counting down) at each noise-span start, noise
    tokens dropped; targets are the tokens themselves; both end with EOS 1."""
    inputs, sentinel, prev = [], first_sentinel, False
    for tok, noise in zip(tokens.tolist(), mask.tolist()):
        if noise and not prev:
            inputs.append(sentinel)
            sentinel -= 1
        elif not noise:
            inputs.append(tok)
        prev = noise
    return inputs + [1], tokens.tolist() + [1]


def test_denoise_matches_an_explicit_computation():
    rng = np.random.default_rng(0)
    for length in (1, 2, 7, SPEC.tokens_length, 100):
        tokens = rng.integers(3, 8000, length).astype(np.int32)
        inputs, targets = denoise(tokens, SPEC, np.random.default_rng(length))
        mask = random_spans_noise_mask(length, 0.15, 3.0, np.random.default_rng(length))
        want_inputs, want_targets = explicit_denoise(tokens, mask, 8099)
        assert inputs.tolist() == want_inputs and targets.tolist() == want_targets
        assert inputs.dtype == targets.dtype == np.int32


def test_denoise_rows_fill_fixed_shapes_and_shift_targets():
    chunks = np.random.default_rng(1).integers(3, 8000, (5, SPEC.tokens_length))
    batch = denoise_rows(chunks, np.array([4, 0, 4]), SPEC, seed=3, epoch=2)
    assert batch["input_ids"].shape == (3, 32)
    assert batch["labels"].shape == (3, SPEC.tokens_length + 1)
    np.testing.assert_array_equal(batch["labels"][:, :-1], chunks[[4, 0, 4]])
    assert (batch["labels"][:, -1] == 1).all() and (batch["input_ids"][:, -1] == 1).all()
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 0], 0)
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    # Row r of epoch e is masked by default_rng([seed, e, r, 1]) whatever the batch.
    want, _ = denoise(chunks[4], SPEC, np.random.default_rng([3, 2, 4, 1]))
    np.testing.assert_array_equal(batch["input_ids"][0], want)
    np.testing.assert_array_equal(batch["input_ids"][2], want)
    assert all(v.dtype == np.int32 for v in batch.values())


def test_is_denoise_batch_spreads_the_fraction_evenly():
    assert [is_denoise_batch(i, 0.5) for i in range(6)] == [False, True] * 3
    assert not any(is_denoise_batch(i, 0.0) for i in range(50))
    assert all(is_denoise_batch(i, 1.0) for i in range(50))
    flags = [is_denoise_batch(i, 0.3) for i in range(1000)]
    assert sum(flags) == 300 and all(2 <= sum(flags[i:i + 10]) <= 4 for i in range(990))
    with pytest.raises(ValueError, match="denoise_fraction"):
        is_denoise_batch(0, 1.5)


def test_mixture_batches_alternate_objectives_and_resume():
    chunks = np.random.default_rng(2).integers(3, 8000, (10, SPEC.tokens_length))
    plain = pretraining_batches(chunks, 3, SPEC, seed=5)
    none = mixture_batches(chunks, 3, SPEC, seed=5, denoise_fraction=0.0)
    for _ in range(7):  # fraction 0: exactly span corruption's batches and positions
        (a, pa), (b, pb) = next(plain), next(none)
        assert pa == pb and all(np.array_equal(a[k], b[k]) for k in a)
    mixed = mixture_batches(chunks, 3, SPEC, seed=5, denoise_fraction=0.5)
    run = [next(mixed) for _ in range(8)]  # 3 batches per epoch: crosses two epochs
    widths = [b["labels"].shape[1] for b, _ in run]
    assert widths == [SPEC.targets_length, SPEC.tokens_length + 1] * 4
    # The same chunk order as span corruption: denoising targets are those rows' chunks.
    for (batch, _), (epoch, index) in zip((run[1], run[3], run[5]), ((0, 1), (1, 0), (1, 2))):
        rows = epoch_permutation(10, 5, epoch)[index * 3:(index + 1) * 3]
        np.testing.assert_array_equal(batch["labels"][:, :-1], chunks[rows])
    resumed = mixture_batches(chunks, 3, SPEC, seed=5, denoise_fraction=0.5,
                              state=run[4][1])
    for want, _ in run[5:]:
        got, _ = next(resumed)
        assert all(np.array_equal(want[k], got[k]) for k in want)


def test_denoise_eval_batches_pad_the_last_batch():
    chunks = np.random.default_rng(3).integers(3, 8000, (5, SPEC.tokens_length))
    batches = list(denoise_eval_batches(chunks, 4, SPEC, seed=0))
    assert [b["example_mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    np.testing.assert_array_equal(batches[1]["labels"][:, :-1], chunks[[4, 4, 4, 4]])
