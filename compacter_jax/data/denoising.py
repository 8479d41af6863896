"""A mixture of T5 span corruption and BART-style full-sequence denoising, in numpy.

Span corruption alone (T5) gives the decoder a target it can half-predict without reading the
encoder (the sentinels, the span lengths, unigram guesses); a small model trained for a few
thousand updates can stay there (`checkpoints/t5-mini-glue` README, the first run). The
denoising task below gives the encoder a signal from the first update: the targets are the
*whole* original chunk, so the decoder must copy the ~85% of tokens it can see in the
encoder's inputs and fill in the masked spans:

    tokens   a b [c d] e f g [h] i          ([..] = noise, as in span corruption)
    inputs   a b <0> e f g <1> i EOS         (exactly span corruption's inputs)
    targets  a b c d e f g h i EOS           (the chunk itself)

This is BART's text infilling with T5's numbered sentinels (Lewis et al. 2020; Raffel et al.
2020 Table 4 "BERT-style"/"deshuffling" family: full-sequence targets). `mixture_batches`
alternates the two objectives batch by batch at a fixed rate (`denoise_fraction`): each
batch is one objective, so both keep a fixed shape (span corruption [B, targets_length],
denoising [B, tokens_length + 1]) and compile once each.

Randomness: chunk r of epoch e is masked with `default_rng([seed, e, r])` for span corruption
(as `span_corruption.corrupt_rows`) and `default_rng([seed, e, r, 1])` for denoising; which
objective a batch uses is a function of its global index only, so a resumed run draws the same
batches as an uninterrupted one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from compacter_jax.data.pipeline import Batch, DataState
from compacter_jax.data.span_corruption import (SpanCorruption, chunk_rows_batch, corrupt_rows,
                                                epoch_batches, in_order_batches)

DENOISE_STREAM = 1
"""Extra seed word of the denoising masks (independent of span corruption's)."""


def denoise(tokens: np.ndarray, spec: SpanCorruption, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 of one raw token sequence: inputs = span corruption's inputs
    (noise spans replaced by sentinels, EOS appended), targets = the tokens + EOS."""
    inputs, _ = spec.corrupt(tokens, rng)   # the same mask draw as span corruption's
    tokens = np.asarray(tokens, dtype=np.int32)
    return inputs, np.concatenate([tokens, np.array([spec.eos_id], np.int32)])


def denoise_rows(chunks: np.ndarray, rows: np.ndarray, spec: SpanCorruption, *, seed: int,
                 epoch: int) -> Batch:
    """The DESIGN.md batch of `chunks[rows]` for the denoising task.

    Args:
      chunks: int32 [N, spec.tokens_length] raw token chunks.
      rows: int [B] chunk indices; chunk r is masked with `default_rng([seed, epoch, r, 1])`.

    Returns:
      {input_ids, attention_mask: [B, spec.inputs_length]; labels, decoder_input_ids,
      decoder_attention_mask: [B, spec.tokens_length + 1]}, int32, masks all ones.
    """
    return chunk_rows_batch(chunks, rows, spec, spec.tokens_length + 1,
                            lambda tokens, rng: denoise(tokens, spec, rng),
                            lambda r: (int(seed), int(epoch), int(r), DENOISE_STREAM))


def is_denoise_batch(index: int, denoise_fraction: float) -> bool:
    """Whether global batch `index` (0-based) is a denoising batch: batches are spread evenly,
    floor((index + 1) * f) > floor(index * f), so any window of n batches holds
    floor(n * f) or ceil(n * f) of them (f = 0.5: every second batch, starting with the
    second; f = 1: all)."""
    if not 0.0 <= denoise_fraction <= 1.0:
        raise ValueError(f"denoise_fraction must be in [0, 1], got {denoise_fraction}")
    return int(np.floor((index + 1) * denoise_fraction)) > int(np.floor(index * denoise_fraction))


def mixture_batches(chunks: np.ndarray, batch_size: int, spec: SpanCorruption, *,
                    seed: int, denoise_fraction: float, state: DataState | None = None
                    ) -> Iterator[tuple[Batch, DataState]]:
    """Endless shuffled batches, each span-corrupted (`corrupt_rows`) or denoising
    (`denoise_rows`) as `is_denoise_batch` says, with the `DataState` to save after each.

    The chunk order is `span_corruption.pretraining_batches`' (a new seeded permutation per
    epoch, the final partial batch dropped); with `denoise_fraction=0` the batches equal that
    function's exactly.
    """
    is_denoise_batch(0, denoise_fraction)  # validates the fraction before the first batch

    def rows_batch(index, rows, epoch):
        make = denoise_rows if is_denoise_batch(index, denoise_fraction) else corrupt_rows
        return make(chunks, rows, spec, seed=seed, epoch=epoch)

    return epoch_batches(chunks, batch_size, seed=seed, state=state, rows_batch=rows_batch)


def denoise_eval_batches(chunks: np.ndarray, batch_size: int, spec: SpanCorruption, *,
                         seed: int) -> Iterator[Batch]:
    """Every chunk once, in order, as a denoising batch (epoch 0 of `seed`); the final batch
    is padded by repeating its last chunk, marked 0 in `example_mask` [B]."""
    return in_order_batches(chunks, batch_size, lambda rows: denoise_rows(
        chunks, rows, spec, seed=seed, epoch=0))
