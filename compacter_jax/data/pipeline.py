"""Tokenised, padded batches (docs/DESIGN.md "Batches"), deterministic shuffling, resume, sharding.

A batch is a dict of numpy int32 arrays:
  input_ids, attention_mask                           [B, S]   (S = max_source_length)
  labels, decoder_input_ids, decoder_attention_mask   [B, T]   (T = max_target_length)
labels are padded with pad_id (0) and masked by decoder_attention_mask; decoder_input_ids =
shift_right(labels) with the start id 0 (= T5's pad / decoder_start_token_id). The same mask
serves labels and decoder inputs: position t of the decoder input is real iff label t is.
Evaluation batches add `example_mask` [B] (1 = real example, 0 = padding of the final batch)
and `example_index` [B] (row in the encoded data, -1 for padding).

An epoch has ceil(N / B) steps, as the original (its last batch is partial): `train_batches`
yields that last batch with its real rows only, and `pad_batch` fills it up to B with empty
rows (all masks 0: no loss, no tokens) where a static shape is needed; packing
(`compacter_jax.data.packing`) packs the real rows instead.

Every host builds the same global batch from the same (seed, epoch) and keeps its slice with
`shard_for_host`, so no coordination is needed beyond a shared seed and `DataState`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Hashable, Iterator, Mapping, Sequence

import numpy as np

from compacter_jax.data.tasks import Example, Task, get_task
from compacter_jax.models import shift_right

Batch = dict[str, np.ndarray]
log = logging.getLogger(__name__)
_CHUNK = 2048  # texts per tokenizer call: bounds the memory of the Python id lists


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedData:
    """A tokenised split; row i of every array belongs to the same (source, target) pair.

    Attributes:
      input_ids, attention_mask: [N, S] int32.  labels, decoder_attention_mask: [N, T] int32.
      references: per row, `task.reference(example)` (for metrics).
      groups: per row, `task.group(example)` (MultiRC question ids; else all None).
      num_truncated_source / num_truncated_target: rows cut to fit S / T.
      sources / targets: per row, the formatted texts (for per-example predictions).
      rows: per row, the row of the official split file the example came from (0-based over
        data rows; -1 where unknown).
    """

    task: Task
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    decoder_attention_mask: np.ndarray
    references: tuple[Any, ...]
    groups: tuple[Hashable | None, ...]
    num_truncated_source: int
    num_truncated_target: int
    sources: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    rows: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class DataState:
    """Position of the training iterator: `index` batches of epoch `epoch` were consumed.

    Save it with the checkpoint (`to_dict`) and pass it back to `train_batches` to resume
    exactly where training stopped.
    """

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataState":
        return cls(epoch=int(d["epoch"]), index=int(d["index"]))


def _pad_truncate(ids: Sequence[Sequence[int]], length: int, pad_id: int, eos_id: int | None
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """[N, length] ids and mask; too-long rows are cut, keeping a final EOS as the last token."""
    out = np.full((len(ids), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(ids), length), dtype=np.int32)
    truncated = 0
    for i, row in enumerate(ids):
        row = list(row)
        if len(row) > length:
            truncated += 1
            ends_with_eos = eos_id is not None and row[-1] == eos_id
            row = row[: length - 1] + [eos_id] if ends_with_eos else row[:length]
        out[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return out, mask, truncated


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    ids: list[list[int]] = []
    for start in range(0, len(texts), _CHUNK):
        ids.extend(tokenizer(list(texts[start:start + _CHUNK]), add_special_tokens=True)["input_ids"])
    return ids


def encode(task: Task | str, examples: Sequence[Example], tokenizer, *, max_source_length: int,
           max_target_length: int, train: bool = False, add_prefix: bool = False,
           rows: Sequence[int] | None = None) -> EncodedData:
    """Formats and tokenises examples (T5 tokenizer: EOS appended, pad id 0).

    Args:
      train: one row per target (ReCoRD: per answer); else exactly one row per example, so
        evaluation scores each example once.
      add_prefix: start each source with the original's task name ("rte sentence1: ..."), as
        the original does for every method except adapters (see `Task.source`).
      rows: the official-split row of each example (kept for per-example predictions).
    """
    task = get_task(task)
    if max_source_length < 2 or max_target_length < 2:
        raise ValueError("max_source_length and max_target_length must be >= 2 "
                         f"(got {max_source_length}, {max_target_length})")
    if not examples:
        raise ValueError(f"{task.name}: no examples to encode")
    if rows is not None and len(rows) != len(examples):
        raise ValueError(f"{len(rows)} rows for {len(examples)} examples")
    sources, targets, refs, groups, origin = [], [], [], [], []
    for i, ex in enumerate(examples):
        pairs = task.format_all(ex, add_prefix) if train else [task.format(ex, add_prefix)]
        for src, tgt in pairs:
            sources.append(src)
            targets.append(tgt)
            refs.append(task.reference(ex))
            groups.append(task.group(ex))
            origin.append(-1 if rows is None else int(rows[i]))
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    input_ids, attention_mask, cut_src = _pad_truncate(
        _tokenize(tokenizer, sources), max_source_length, pad_id, eos_id)
    labels, decoder_mask, cut_tgt = _pad_truncate(
        _tokenize(tokenizer, targets), max_target_length, pad_id, eos_id)
    if cut_src or cut_tgt:
        log.warning("%s: truncated %d/%d sources to %d tokens and %d targets to %d tokens",
                    task.name, cut_src, len(sources), max_source_length, cut_tgt,
                    max_target_length)
    return EncodedData(task, input_ids, attention_mask, labels, decoder_mask, tuple(refs),
                       tuple(groups), cut_src, cut_tgt, tuple(sources), tuple(targets),
                       tuple(origin))


def make_batch(data: EncodedData, rows: np.ndarray, start_id: int = 0) -> Batch:
    """The DESIGN.md batch for the given rows of `data`."""
    rows = np.asarray(rows, dtype=np.int64)
    labels = data.labels[rows]
    return {
        "input_ids": data.input_ids[rows],
        "attention_mask": data.attention_mask[rows],
        "labels": labels,
        "decoder_input_ids": shift_right(labels, start_id).astype(np.int32),
        "decoder_attention_mask": data.decoder_attention_mask[rows],
    }


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Row order of an epoch; a pure function of (seed, epoch), equal on every host."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(num_rows)


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Training batches per epoch: ceil(num_rows / batch_size), the last one partial (as the
    original's data loader, which does not drop it)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-num_rows // batch_size)


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int, *,
              source_multiple: int = 0) -> Batch:
    """A batch of fewer than `batch_size` rows filled up with empty rows (every id and mask 0:
    they add no loss and no tokens), so the train step keeps one static shape;
    `source_multiple` > 0 also cuts its source columns (`trim_source`)."""
    rows = next(iter(batch.values())).shape[0]
    if rows > batch_size:
        raise ValueError(f"batch has {rows} rows, more than batch_size={batch_size}")
    if rows == batch_size:
        batch = dict(batch)
    else:
        batch = {k: np.concatenate([v, np.zeros((batch_size - rows,) + v.shape[1:], v.dtype)])
                 for k, v in batch.items()}
    return trim_source(batch, source_multiple) if source_multiple else batch


SOURCE_COLUMNS = ("input_ids", "attention_mask")


def trim_source(batch: Mapping[str, np.ndarray], multiple_of: int) -> Batch:
    """The batch with its source columns (`input_ids`, `attention_mask` [B, S]) cut to its
    longest source rounded up to a multiple of `multiple_of` (at most S): the columns cut
    hold only padding, which every layer masks, so the loss and gradients are those of the
    full batch while the step computes on fewer positions. One compilation per width seen
    (at most ceil(S / multiple_of)).

    Args:
      batch: a padded batch (`make_batch` / `pad_batch`); other columns are kept as they are.
      multiple_of: the width granularity (> 0), e.g. 32.
    Returns:
      The batch, source columns [B, S'] with S' = min(S, multiple_of * ceil(longest /
      multiple_of)), S' >= multiple_of (>= 1 column even for a batch of empty rows).
    """
    if multiple_of <= 0:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    mask = batch["attention_mask"]
    used = np.flatnonzero(mask.any(axis=0))
    longest = int(used[-1]) + 1 if used.size else 0
    width = min(mask.shape[1], max(1, -(-longest // multiple_of)) * multiple_of)
    return {k: (v[:, :width] if k in SOURCE_COLUMNS else v) for k, v in batch.items()}


def train_batches(data: EncodedData, batch_size: int, *, seed: int,
                  state: DataState | None = None, num_epochs: int | None = None
                  ) -> Iterator[tuple[Batch, DataState]]:
    """Shuffled batches, yielded with the `DataState` to save *after* consuming each; the last
    batch of an epoch holds the remaining rows only (see `pad_batch`).

    Starts at `state` (default: epoch 0, batch 0) and runs until epoch `num_epochs` (None:
    forever). Resuming from a saved state yields exactly the batches that would have followed.
    """
    if batch_size <= 0 or batch_size > len(data):
        raise ValueError(f"batch_size {batch_size} must be in 1..{len(data)} (the number of "
                         f"{data.task.name} training rows)")
    per_epoch = steps_per_epoch(len(data), batch_size)
    state = state or DataState()
    epoch, index = state.epoch + state.index // per_epoch, state.index % per_epoch
    while num_epochs is None or epoch < num_epochs:
        order = epoch_permutation(len(data), seed, epoch)
        for i in range(index, per_epoch):
            rows = order[i * batch_size:(i + 1) * batch_size]
            nxt = DataState(epoch + 1, 0) if i + 1 == per_epoch else DataState(epoch, i + 1)
            yield make_batch(data, rows), nxt
        epoch, index = epoch + 1, 0


def eval_batches(data: EncodedData, batch_size: int) -> Iterator[Batch]:
    """In-order batches covering every row exactly once; the last one is padded to
    `batch_size` by repeating its final real row, marked 0 in `example_mask`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    for start in range(0, n, batch_size):
        real = np.arange(start, min(start + batch_size, n))
        pad = batch_size - len(real)
        rows = np.concatenate([real, np.full(pad, real[-1])]) if pad else real
        batch = make_batch(data, rows)
        batch["example_mask"] = (np.arange(batch_size) < len(real)).astype(np.int32)
        batch["example_index"] = np.where(batch["example_mask"] == 1, rows, -1).astype(np.int32)
        yield batch


def shard_for_host(batch: Mapping[str, np.ndarray], process_index: int, process_count: int
                   ) -> Batch:
    """This host's contiguous slice of a global batch (leading axis split in process_count)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in 0..{process_count - 1}")
    sizes = {k: v.shape[0] for k, v in batch.items()}
    size = next(iter(sizes.values()))
    if any(s != size for s in sizes.values()):
        raise ValueError(f"batch arrays disagree on the batch size: {sizes}")
    if size % process_count:
        raise ValueError(f"global batch size {size} is not divisible by {process_count} hosts")
    per = size // process_count
    return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


def decode_predictions(tokenizer, ids: np.ndarray) -> list[str]:
    """Generated ids [B, L] -> texts (special tokens and padding dropped, stripped)."""
    texts = tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)
    return [t.strip() for t in texts]
