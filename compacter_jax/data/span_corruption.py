"""T5's span-corruption pretraining objective (Raffel et al. 2020), in numpy.

The semantics are those of `t5.data.preprocessors.span_corruption` (the seqio/t5x recipe):

* `random_spans_noise_mask(length, 0.15, 3.0, rng)`: exactly round(length * density) noise
  tokens in round(noise / mean_span) spans; noise and non-noise spans alternate, starting with
  non-noise, and every segmentation of the two counts into non-empty spans is equally likely.
* inputs = the tokens with each noise span replaced by one sentinel, targets = the tokens with
  each non-noise span replaced by one sentinel; sentinels count down from `<extra_id_0>` =
  32099 (T5's `vocab_size - 1`) in order of appearance, and both end with EOS (id 1):

      tokens   a b [c d] e f g [h] i          ([..] = noise)
      inputs   a b <0> e f g <1> i EOS
      targets  <0> c d <1> h <2> EOS

* `random_spans_helper(inputs_length)`: the raw chunk length that fills exactly
  `inputs_length` input tokens after corruption (EOS included), and the targets length.

Randomness: one `np.random.Generator` per call; `corrupt_rows` seeds one Generator per
(seed, epoch, chunk row), so a chunk's corruption does not depend on which batch it lands in
and a resumed run draws the same masks as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from compacter_jax.data.pipeline import Batch, DataState, epoch_permutation, shift_right

FIRST_SENTINEL_ID = 32099
"""`<extra_id_0>` in the T5 vocabulary (`tokenizer.convert_tokens_to_ids("<extra_id_0>")`);
`<extra_id_k>` is 32099 - k."""
NUM_SENTINELS = 100
EOS_ID = 1


def first_sentinel_id(tokenizer) -> int:
    """The id of `<extra_id_0>` in `tokenizer` (32099 in T5's vocabulary; `len(tokenizer) - 1`
    in any vocabulary `transformers.T5Tokenizer` builds from a SentencePiece model), checking
    that `<extra_id_k>` is that id minus k for every k < NUM_SENTINELS, as the functions here
    assume.

    Raises:
      ValueError: the tokenizer has no such run of sentinels (not a T5-style vocabulary).
    """
    ids = [tokenizer.convert_tokens_to_ids(f"<extra_id_{k}>") for k in range(NUM_SENTINELS)]
    first = ids[0]
    unk = getattr(tokenizer, "unk_token_id", None)
    if first is None or first == unk or ids != list(range(first, first - NUM_SENTINELS, -1)):
        raise ValueError(f"the tokenizer lacks T5's {NUM_SENTINELS} sentinels <extra_id_0..99> "
                         "counting down from one id; span corruption needs a T5 vocabulary "
                         "(transformers.T5Tokenizer, extra_ids=100)")
    return int(first)


def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """Raw-token chunk length and targets length for a desired inputs length (no padding).

    Args:
      inputs_length: wanted length of the corrupted inputs, EOS included (e.g. 512 or 128).
      noise_density / mean_noise_span_length: as in `random_spans_noise_mask`.
      extra_tokens_per_span_*: sentinels per span in inputs / targets (1 for span corruption).

    Returns:
      (tokens_length, targets_length): the largest chunk length whose corrupted inputs fit in
      `inputs_length`, and the exact length of its targets (EOS included). T5's defaults:
      512 -> (568, 114); 128 -> (141, 29).
    """
    if inputs_length < 2:
        raise ValueError(f"inputs_length must be >= 2, got {inputs_length}")
    # Outside (0, 1) no chunk length fits (the search below would never end).
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density} (T5: 0.15)")
    if not mean_noise_span_length >= 1.0:
        raise ValueError("mean_noise_span_length must be >= 1 (tokens per span), got "
                         f"{mean_noise_span_length} (T5: 3.0)")

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (tokens_length - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = lengths(tokens_length)
    # As the original: with density 0.5, make targets no longer than the (round) inputs.
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Lengths (int64 [num_segments], all >= 1, summing to num_items) of a uniformly random
    split of `num_items` items into `num_segments` non-empty runs (the original shuffles a
    vector of num_segments - 1 segment starts among the num_items - 1 inner positions)."""
    starts = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment_id = np.cumsum(np.concatenate([[0], starts.astype(np.int64)]))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
    """Boolean noise mask [length] made of random spans (see the module docstring).

    Degenerate lengths behave as the original: the mask is built for max(length, 2) tokens
    with at least one noise and one non-noise token and one span, then cut to `length`.
    """
    if noise_density == 0.0:
        return np.zeros(length, dtype=bool)
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in [0, 1), got {noise_density}")
    if mean_noise_span_length <= 0:
        raise ValueError(f"mean_noise_span_length must be > 0, got {mean_noise_span_length}")
    orig_length, length = length, max(length, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise = np.tile([False, True], num_spans)
    return np.repeat(is_noise, interleaved)[:orig_length]


def noise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                  first_sentinel_id: int = FIRST_SENTINEL_ID) -> np.ndarray:
    """Replaces each run of noise tokens by one sentinel (first_sentinel_id, -1, -2, ...).

    Args: tokens int [L]; noise_mask bool [L]. Returns int [L - noise + spans], tokens' dtype.
    """
    tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, dtype=bool)
    if tokens.shape != noise_mask.shape or tokens.ndim != 1:
        raise ValueError(f"tokens {tokens.shape} and noise_mask {noise_mask.shape} must be the "
                         "same 1-D shape")
    prev_is_noise = np.concatenate([[False], noise_mask[:-1]])
    first_noise = noise_mask & ~prev_is_noise
    sentinels = first_sentinel_id + 1 - np.cumsum(first_noise)
    out = np.where(first_noise, sentinels, tokens).astype(tokens.dtype)
    return out[~(noise_mask & prev_is_noise)]


def nonnoise_span_to_unique_sentinel(tokens: np.ndarray, noise_mask: np.ndarray,
                                     first_sentinel_id: int = FIRST_SENTINEL_ID) -> np.ndarray:
    """The targets side: each run of *non-noise* tokens becomes one sentinel."""
    return noise_span_to_unique_sentinel(tokens, ~np.asarray(noise_mask, dtype=bool),
                                         first_sentinel_id)


@dataclasses.dataclass(frozen=True)
class SpanCorruption:
    """Span-corruption settings; `tokens_length` raw tokens -> `inputs_length` inputs and
    `targets_length` targets exactly (both with EOS), so batches need no padding.

    Attributes:
      inputs_length: corrupted input length (EOS included).
      noise_density / mean_noise_span_length: 0.15 / 3.0 in T5.
      first_sentinel_id: id of `<extra_id_0>`; eos_id: appended to inputs and targets.
    """

    inputs_length: int = 128
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    first_sentinel_id: int = FIRST_SENTINEL_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        num_noise = int(round(self.tokens_length * self.noise_density))
        spans = max(int(round(num_noise / self.mean_noise_span_length)), 1)
        if spans > NUM_SENTINELS:
            raise ValueError(f"SpanCorruption(inputs_length={self.inputs_length}) needs {spans} "
                             f"sentinels per chunk; T5 has {NUM_SENTINELS}: use a shorter "
                             "inputs_length or longer spans")

    @property
    def tokens_length(self) -> int:
        """Raw tokens per chunk."""
        return random_spans_helper(self.inputs_length, self.noise_density,
                                   self.mean_noise_span_length, 1, 1)[0]

    @property
    def targets_length(self) -> int:
        return random_spans_helper(self.inputs_length, self.noise_density,
                                   self.mean_noise_span_length, 1, 1)[1]

    def corrupt(self, tokens: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) int32 of one raw token sequence (any length >= 1), EOS appended."""
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise ValueError(f"tokens must be a non-empty 1-D array, got shape {tokens.shape}")
        mask = random_spans_noise_mask(tokens.size, self.noise_density,
                                       self.mean_noise_span_length, rng)
        eos = np.array([self.eos_id], np.int32)
        inputs = noise_span_to_unique_sentinel(tokens, mask, self.first_sentinel_id)
        targets = nonnoise_span_to_unique_sentinel(tokens, mask, self.first_sentinel_id)
        return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def corrupt_rows(chunks: np.ndarray, rows: np.ndarray, spec: SpanCorruption, *, seed: int,
                 epoch: int) -> Batch:
    """The DESIGN.md batch of span-corrupted `chunks[rows]`.

    Args:
      chunks: int32 [N, spec.tokens_length] raw token chunks.
      rows: int [B] chunk indices; chunk r is corrupted with `default_rng([seed, epoch, r])`.

    Returns:
      {input_ids, attention_mask: [B, inputs_length]; labels, decoder_input_ids,
      decoder_attention_mask: [B, targets_length]}, int32, masks all ones (no padding).
    """
    return chunk_rows_batch(chunks, rows, spec, spec.targets_length, spec.corrupt,
                            lambda r: (int(seed), int(epoch), int(r)))


def chunk_rows_batch(chunks: np.ndarray, rows: np.ndarray, spec: SpanCorruption,
                     targets_length: int, example_fn, rng_key) -> Batch:
    """The DESIGN.md batch of `example_fn(chunks[r], default_rng(rng_key(r)))` for r in rows
    (one pretraining objective: span corruption, denoising): inputs [B, spec.inputs_length],
    labels [B, targets_length], int32, masks all ones (every row is full)."""
    chunks = np.asarray(chunks)
    if chunks.ndim != 2 or chunks.shape[1] != spec.tokens_length:
        raise ValueError(f"chunks must be [N, {spec.tokens_length}] (spec.tokens_length for "
                         f"inputs_length={spec.inputs_length}), got {chunks.shape}")
    rows = np.asarray(rows, dtype=np.int64)
    inputs = np.empty((len(rows), spec.inputs_length), np.int32)
    labels = np.empty((len(rows), targets_length), np.int32)
    for i, r in enumerate(rows):
        inputs[i], labels[i] = example_fn(chunks[r], np.random.default_rng(rng_key(r)))
    return {"input_ids": inputs, "attention_mask": np.ones_like(inputs),
            "labels": labels, "decoder_input_ids": shift_right(labels).astype(np.int32),
            "decoder_attention_mask": np.ones_like(labels)}


def pretraining_batches(chunks: np.ndarray, batch_size: int, spec: SpanCorruption, *,
                        seed: int, state: DataState | None = None
                        ) -> Iterator[tuple[Batch, DataState]]:
    """Endless shuffled batches of freshly corrupted chunks, with the `DataState` to save
    after each (as `pipeline.train_batches`). Each epoch is a new seeded permutation of the
    chunks (the final partial batch is dropped) and draws new noise masks."""
    return epoch_batches(chunks, batch_size, seed=seed, state=state, rows_batch=lambda _, rows,
                         epoch: corrupt_rows(chunks, rows, spec, seed=seed, epoch=epoch))


def epoch_batches(chunks: np.ndarray, batch_size: int, *, seed: int, state: DataState | None,
                  rows_batch) -> Iterator[tuple[Batch, DataState]]:
    """Endless batches `rows_batch(global_index, rows, epoch)` over a new seeded permutation of
    the chunks each epoch (the final partial batch dropped), with the `DataState` to save after
    each: the order every pretraining objective shares."""
    n = len(chunks)
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size {batch_size} must be in 1..{n} (the number of chunks)")
    per_epoch = n // batch_size
    state = state or DataState()
    epoch, index = state.epoch + state.index // per_epoch, state.index % per_epoch
    while True:
        order = epoch_permutation(n, seed, epoch)
        for i in range(index, per_epoch):
            rows = order[i * batch_size:(i + 1) * batch_size]
            nxt = DataState(epoch + 1, 0) if i + 1 == per_epoch else DataState(epoch, i + 1)
            yield rows_batch(epoch * per_epoch + i, rows, epoch), nxt
        epoch, index = epoch + 1, 0


def eval_batches(chunks: np.ndarray, batch_size: int, spec: SpanCorruption, *, seed: int
                 ) -> Iterator[Batch]:
    """Every chunk once, in order, with a fixed corruption (epoch 0 of `seed`); the final
    batch is padded by repeating its last chunk, marked 0 in `example_mask` [B]."""
    return in_order_batches(chunks, batch_size, lambda rows: corrupt_rows(
        chunks, rows, spec, seed=seed, epoch=0))


def in_order_batches(chunks: np.ndarray, batch_size: int, rows_batch) -> Iterator[Batch]:
    """`rows_batch(rows)` over every chunk once, in order; the final batch is padded by
    repeating its last chunk, marked 0 in `example_mask` [B]."""
    n = len(chunks)
    if n == 0 or batch_size <= 0:
        raise ValueError(f"need chunks and a positive batch size (got {n}, {batch_size})")
    for start in range(0, n, batch_size):
        real = np.arange(start, min(start + batch_size, n))
        rows = np.concatenate([real, np.full(batch_size - len(real), real[-1])])
        batch = rows_batch(rows)
        batch["example_mask"] = (np.arange(batch_size) < len(real)).astype(np.int32)
        yield batch
