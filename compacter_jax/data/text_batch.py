"""The batch dict of the train and eval steps, from texts (for a hand-written training loop).

    batch = cj.make_batch(tok, ["rte sentence1: ... sentence2: ..."], ["0"])
    state, metrics = jax.jit(step)(state, frozen, batch)
    packed = cj.make_batch(tok, sources, targets, pack=True)   # several examples per row

A batch is docs/DESIGN.md's ("Batches"): numpy int32 `input_ids`, `attention_mask` [B, S];
`labels`, `decoder_input_ids`, `decoder_attention_mask` [B, T]; packed, rows hold several
examples and four more keys tell them apart (`data/packing.py`). Texts are tokenised as the
experiments do (EOS appended, pad 0, too-long rows cut keeping the final EOS, with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from compacter_jax.data.packing import assign_rows, pack_batch
from compacter_jax.data.pipeline import Batch, _pad_truncate, _tokenize, pad_batch
from compacter_jax.models import shift_right


def _texts(name: str, values: Sequence[str]) -> list[str]:
    if isinstance(values, str):
        raise ValueError(f"{name} must be a list of strings, got one string; wrap it: [{name}]")
    values = list(values)
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{name}[{bad[0]}] is {type(values[bad[0]]).__name__}, not a string")
    return values


def _encode(tokenizer, texts: list[str], length: int | None, name: str
            ) -> tuple[np.ndarray, np.ndarray]:
    ids = _tokenize(tokenizer, texts)
    longest = max(len(row) for row in ids)
    length = longest if length is None else length
    if length < 1:
        raise ValueError(f"max_{name}_length must be >= 1, got {length}")
    out, mask, cut = _pad_truncate(ids, length, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if cut:
        warnings.warn(f"make_batch: {cut} of {len(texts)} {name}s are longer than "
                      f"max_{name}_length={length} tokens and were cut (longest: {longest})",
                      stacklevel=3)
    return out, mask


def make_batch(tokenizer, sources: Sequence[str], targets: Sequence[str], *,
               max_source_length: int | None = None, max_target_length: int | None = None,
               batch_size: int | None = None, pack: bool = False,
               packed_target_length: int | None = None, row_multiple: int = 1) -> Batch:
    """The train/eval step's batch for (source, target) text pairs.

    Args:
      tokenizer: a T5 tokenizer (`cj.load_tokenizer()`); EOS is appended to every text.
      sources, targets: lists of N strings (e.g. "rte sentence1: ... sentence2: ...", "0").
      max_source_length / max_target_length: S and T; None = the longest text's length.
        Longer texts are cut keeping their final EOS (a warning says how many).
      batch_size: padded: add empty rows up to this many (one static shape per step; they add
        no loss); None = N.
      pack: several examples per row (first-fit over S source and `packed_target_length`
        target tokens per row) plus `encoder_segment_ids`, `encoder_positions`,
        `decoder_segment_ids`, `decoder_positions`; the loss is the padded batch's.
      packed_target_length: target tokens per packed row (default T).
      row_multiple: packed: the number of rows is rounded up to a multiple of this (e.g. the
        device count; with `batch_size` the row count is `batch_size`).
    Returns:
      dict of numpy int32 arrays: [B, S] / [B, T] (packed: [R, S] / [R, T_packed]).
    """
    sources, targets = _texts("sources", sources), _texts("targets", targets)
    if len(sources) != len(targets) or not sources:
        raise ValueError(f"make_batch needs as many targets as sources, at least one: got "
                         f"{len(sources)} sources and {len(targets)} targets")
    input_ids, attention_mask = _encode(tokenizer, sources, max_source_length, "source")
    labels, decoder_mask = _encode(tokenizer, targets, max_target_length, "target")
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
             "decoder_input_ids": shift_right(labels, 0).astype(np.int32),
             "decoder_attention_mask": decoder_mask}
    if not pack:
        return pad_batch(batch, len(sources) if batch_size is None else batch_size)
    target_length = packed_target_length or labels.shape[1]
    layout = assign_rows(attention_mask.sum(1), decoder_mask.sum(1),
                         max_source_length=input_ids.shape[1],
                         packed_target_length=target_length)
    rows = -(-layout.num_rows // row_multiple) * row_multiple
    if batch_size is not None:
        if batch_size < layout.num_rows:
            raise ValueError(f"packed, these {len(sources)} examples need {layout.num_rows} rows: "
                             f"batch_size={batch_size} is too small")
        rows = batch_size
    return pack_batch(batch, max_source_length=input_ids.shape[1],
                      packed_target_length=target_length, row_buckets=(rows,))
