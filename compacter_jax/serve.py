"""Mixed-task serving: one frozen T5, one adapter per task, batches that mix tasks freely.

    predictor = Predictor("t5-base", {"rte": "runs/rte/adapter", "mrpc": "runs/mrpc/adapter"})
    predictor.predict([{"task": "rte", "sentence1": "...", "sentence2": "..."},
                       {"task": "mrpc", "sentence1": "...", "sentence2": "..."}])
    # -> the examples with "prediction" (generated text) and "parsed" (the task's label) added

The adapters (`peft.save_adapter` / `experiments.glue` / `experiments.multitask` exports) must
come from one method and one backbone; they are stacked into a bank
(`compacter_jax.peft.bank`) next to one copy of the frozen backbone. Each example is formatted
as its adapter was trained (`Task.source` with the export's `add_task_prefix`, cut to its
`max_source_length`), examples are sorted by length into batches trimmed to a few length
buckets, and greedy decoding with the KV cache runs every row with its own adapter
(`bank_greedy_generate`): one compiled program per bucket, whatever the mix of tasks. A row's
output is cut to its task's `max_target_length`, so every prediction is token for token what
the single-task model with that adapter generates (greedy decoding is causal).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.data.metrics import jsonable
from compacter_jax.data.packing import default_length_buckets
from compacter_jax.models import T5ForConditionalGeneration, hf_io, stack_blocks
from compacter_jax.models.config import is_random
from compacter_jax.peft import bank as bank_lib
from compacter_jax.peft.export import fit_export
from compacter_jax.tokenizer import tokenizer_for_model

log = logging.getLogger(__name__)
# Export fields that do not change what a method computes (a lr override is still the method).
_IGNORED_METHOD_FIELDS = ("learning_rate",)


class ServeError(ValueError):
    """Bad adapters or examples; `index` is the example's position in `predict`'s input."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """What an adapter export records about how its task was trained.

    Attributes:
      task: the task's registry name; path: the export directory.
      method: the Method it was trained with; model / init_seed: its backbone (a `random:`
        backbone is drawn from init_seed).
      max_source_length / max_target_length: its source cut and decode length.
      add_task_prefix: whether its inputs start with the task name.
    """

    task: str
    path: Path
    method: peft.Method
    model: str | None
    init_seed: int
    max_source_length: int
    max_target_length: int
    add_task_prefix: bool
    vocab_size: int | None = None  # the vocabulary it was trained on, when cut to a tokenizer


def read_adapter(task: str, path: str | Path) -> tuple[AdapterSpec, dict]:
    """(spec, trained tree) of the export at `path`, given for `task`.

    Raises ServeError for an unknown task, an export trained on another task or lacking the
    lengths it was trained with; FileNotFoundError / AdapterFileError (naming the file) for a
    missing or corrupt export."""
    try:
        name = data_lib.get_task(task).name
    except ValueError as e:
        raise ServeError(f"adapter {task}={path}: {e}") from None
    trained, meta = peft.load_trainable(path)
    method = peft.method_of_export(meta, path)
    recorded = meta.get("task")
    if recorded is not None and data_lib.get_task(recorded).name != name:
        raise ServeError(f"adapter {path} was trained on task {recorded!r} but is given for "
                         f"{task!r}: pass it as {recorded}={path}")
    lengths = {}
    for field in ("max_source_length", "max_target_length"):
        value = meta.get(field)
        if not isinstance(value, int) or value < 1:
            raise ServeError(f"{path}: the export records no {field} ({value!r}); re-export it "
                             "with experiments.glue or save_adapter(..., max_source_length=, "
                             "max_target_length=, add_task_prefix=)")
        lengths[field] = value
    prefix = meta.get("add_task_prefix")
    spec = AdapterSpec(name, Path(path), method, meta.get("model"),
                       int(meta.get("init_seed", 0)), lengths["max_source_length"],
                       lengths["max_target_length"],
                       type(method).task_prefix if prefix is None else bool(prefix),
                       int(meta["vocab_size"]) if meta.get("vocab_size") is not None else None)
    return spec, trained


def _method_key(method: peft.Method) -> dict:
    return {k: v for k, v in method.to_dict().items() if k not in _IGNORED_METHOD_FIELDS}


def check_compatible(specs: Sequence[AdapterSpec]) -> None:
    """Raises ServeError naming the tasks when the adapters differ in method or backbone."""
    first = specs[0]
    for spec in specs[1:]:
        if _method_key(spec.method) != _method_key(first.method):
            a, b = _method_key(first.method), _method_key(spec.method)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ServeError(
                f"adapters of different methods cannot share a bank: {first.task} "
                f"({first.path}) is {first.method.name!r}, {spec.task} ({spec.path}) is "
                f"{spec.method.name!r} (they differ in {diff})")
        if spec.model != first.model:
            raise ServeError(
                f"adapters of different backbones: {first.task} was trained on "
                f"{first.model!r}, {spec.task} on {spec.model!r}; serve adapters of one backbone")
        if spec.vocab_size != first.vocab_size:
            raise ServeError(
                f"adapters of different vocabularies: {first.task} was trained on "
                f"{first.vocab_size or 'the full'} entries, {spec.task} on "
                f"{spec.vocab_size or 'the full'}; serve adapters of one vocabulary")
        if is_random(spec.model) and spec.init_seed != first.init_seed:
            raise ServeError(
                f"adapters of different backbones: {first.task} and {spec.task} were trained "
                f"on {spec.model} drawn with init_seed {first.init_seed} and {spec.init_seed}")


def _fit(spec: AdapterSpec, trained: dict, template: dict, scanned: bool, backbone: str
         ) -> dict:
    """The export's tree in the layout and dtypes of the model's trainable tree, fitted as
    `peft.load_adapter` fits it."""
    try:
        return fit_export(trained, template, path=spec.path, backbone=backbone,
                          method=spec.method, scan_layers=scanned)
    except peft.AdapterFileError as e:
        raise ServeError(f"the {spec.task} adapter: {e}") from None


def _load_backbone(backbone: str, method: peft.Method, init_seed: int, dtype: str,
                   scan: bool, vocab_size: int | None = None):
    """(model, params) of the backbone with the method's hooks (its vocabulary cut to
    `vocab_size` as in training). A `random:` backbone is drawn unscanned, as
    `peft.load_adapter` draws it (a scanned draw gives other weights), and stacked when
    scanning: the served model is then the one `load_adapter` rebuilds."""
    rng = jax.random.PRNGKey(init_seed)
    if not (scan and is_random(backbone)):
        return peft.from_pretrained(backbone, method, rng, dtype=dtype, scan_layers=scan,
                                    vocab_size=vocab_size)
    model, params = peft.from_pretrained(backbone, method, rng, dtype=dtype,
                                         vocab_size=vocab_size)
    scanned = T5ForConditionalGeneration(model.config.replace(scan_layers=True), model.hooks)
    return scanned, stack_blocks(params)


class Predictor:
    """Serves several task adapters of one method on one frozen backbone.

    Args:
      backbone: checkpoint dir, Hub id or `random:<preset>`; None = the backbone the
        adapters record.
      adapters: {task name: export directory}.
      tokenizer: a tokenizer dir or Hub id, or a loaded tokenizer (default: the backbone's
        own spiece.model; the shared T5 vocabulary for a `random:` backbone).
      batch_size: rows per decoding batch (at most; a call's last, shorter batch is padded
        to the next power of two of its examples, not to batch_size).
      dtype: compute dtype ("float32" | "bfloat16").
      scan_layers: scan the T5 blocks (None: when the method allows it).
      length_buckets: source widths of the batches (default: powers of two up to the longest
        max_source_length of the adapters).
    Raises ServeError (unknown task, mixed methods or backbones, an adapter that does not
    fit) and FileNotFoundError (a missing export), naming the task and the file.
    """

    def __init__(self, backbone: str | None, adapters: Mapping[str, str | Path], *,
                 tokenizer: Any = None, batch_size: int = 32, dtype: str = "float32",
                 scan_layers: bool | None = None, length_buckets: Sequence[int] | None = None):
        if not adapters:
            raise ServeError("no adapters given: pass {task: export directory}")
        if batch_size < 1:
            raise ServeError(f"batch_size must be >= 1, got {batch_size}")
        read = [read_adapter(task, path) for task, path in adapters.items()]
        specs = [spec for spec, _ in read]
        twice = sorted({s.task for s in specs if [t.task for t in specs].count(s.task) > 1})
        if twice:
            raise ServeError(f"task(s) {twice} given more than once")
        check_compatible(specs)
        self.method = specs[0].method
        bank_lib.check_bankable(self.method)
        backbone = backbone or specs[0].model
        if not backbone:
            raise ServeError(f"{specs[0].path}: no backbone recorded; pass the backbone")
        if specs[0].model and backbone != specs[0].model:
            log.warning("serving adapters trained on %s with the backbone %s", specs[0].model,
                        backbone)
        scan = self.method.hooks().uniform_over_layers() if scan_layers is None else scan_layers
        self.model, params = _load_backbone(backbone, self.method, specs[0].init_seed, dtype,
                                            scan, specs[0].vocab_size)
        template, self.frozen = self.method.partition(params)
        del params
        self.bank = bank_lib.stack_adapters([_fit(s, t, template, scan, backbone)
                                                  for s, t in read])
        self.specs = {s.task: s for s in specs}
        self.task_index = {s.task: k for k, s in enumerate(specs)}
        self.tokenizer = tokenizer if hasattr(tokenizer, "batch_decode") else tokenizer_for_model(
            hf_io.model_dir(backbone), tokenizer, vocab_size=self.model.config.vocab_size,
            model=backbone)
        self.batch_size = int(batch_size)
        widest = max(s.max_source_length for s in specs)
        self.length_buckets = tuple(sorted(length_buckets or default_length_buckets(widest)))
        self.max_new_tokens = max(s.max_target_length for s in specs)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.specs)

    # -- input ---------------------------------------------------------------------------
    def _task_of(self, i: int, example: Any) -> str:
        if not isinstance(example, Mapping):
            raise ServeError(f"example {i} is a {type(example).__name__}, expected an object "
                             "with a 'task' and the task's fields", i)
        if "task" not in example:
            raise ServeError(f"example {i} has no 'task' field (the adapter to use; loaded: "
                             f"{', '.join(self.tasks)})", i)
        try:
            name = data_lib.get_task(example["task"]).name
        except ValueError as e:
            raise ServeError(f"example {i}: {e}", i) from None
        if name not in self.specs:
            raise ServeError(f"example {i}: task {example['task']!r} has no adapter here; "
                             f"loaded: {', '.join(self.tasks)}", i)
        return name

    def encode(self, examples: Sequence[Mapping[str, Any]]) -> tuple[list, np.ndarray]:
        """(source ids per example, adapter index per example) as each task was trained."""
        names = [self._task_of(i, ex) for i, ex in enumerate(examples)]
        ids: list[np.ndarray | None] = [None] * len(examples)
        for name in dict.fromkeys(names):
            spec, rows = self.specs[name], [i for i, n in enumerate(names) if n == name]
            # Labels play no part in a prediction: blank them so unlabelled input encodes.
            blank = [{**examples[i], "label": -1, "answers": ()} for i in rows]
            try:
                encoded = data_lib.encode(name, blank, self.tokenizer,
                                          max_source_length=spec.max_source_length,
                                          max_target_length=2, add_prefix=spec.add_task_prefix)
            except (KeyError, ValueError) as e:
                bad = next((i for i in rows if not _formats(name, examples[i])), rows[0])
                message = e.args[0] if isinstance(e, KeyError) else str(e)
                raise ServeError(f"example {bad}: {message}", bad) from None
            for i, row, mask in zip(rows, encoded.input_ids, encoded.attention_mask):
                ids[i] = row[:int(mask.sum())]
        return ids, np.array([self.task_index[n] for n in names], np.int32)

    # -- prediction ----------------------------------------------------------------------
    def _batches(self, ids: list[np.ndarray], task_ids: np.ndarray):
        """(rows, task_ids, input_ids, attention_mask) of length-sorted batches, each trimmed
        to the smallest length bucket that holds it; the last one repeats its final row up
        to `padded_rows`."""
        lengths = np.array([len(x) for x in ids])
        if lengths.max() > self.length_buckets[-1]:
            raise ServeError(f"a source has {lengths.max()} tokens, more than the largest "
                             f"length bucket {self.length_buckets[-1]}")
        order = np.lexsort((np.arange(len(ids)), lengths))
        for start in range(0, len(order), self.batch_size):
            real = order[start:start + self.batch_size]
            rows = np.concatenate([real, np.full(padded_rows(len(real), self.batch_size)
                                                 - len(real), real[-1])])
            width = next(b for b in self.length_buckets if b >= lengths[real].max())
            input_ids = np.zeros((len(rows), width), np.int32)
            for r, i in enumerate(rows):
                input_ids[r, :lengths[i]] = ids[i]
            mask = (np.arange(width)[None] < lengths[rows][:, None]).astype(np.int32)
            yield real, task_ids[rows], input_ids, mask

    def generate(self, examples: Sequence[Mapping[str, Any]]) -> list[np.ndarray]:
        """Generated token ids of every example (in input order), each cut to its task's
        max_target_length (0 after EOS)."""
        if not len(examples):
            return []
        ids, task_ids = self.encode(examples)
        limits = np.array([s.max_target_length for s in self.specs.values()])
        out: list[np.ndarray | None] = [None] * len(examples)
        for real, batch_tasks, input_ids, mask in self._batches(ids, task_ids):
            tokens = np.asarray(bank_lib.bank_greedy_generate(
                self.model, self.method, self.bank, self.frozen, batch_tasks, input_ids, mask,
                max_new_tokens=self.max_new_tokens))
            for r, i in enumerate(real):
                out[i] = tokens[r, :limits[batch_tasks[r]]]
        return out

    def predict(self, examples: Sequence[Mapping[str, Any]]) -> list[dict]:
        """Each example (a dict in the task registry's field names plus "task") with
        `prediction` (the generated text) and `parsed` (`Task.parse_prediction`) added."""
        tokens = self.generate(examples)
        padded = np.zeros((len(tokens), self.max_new_tokens), np.int32)  # 0 = pad, skipped
        for i, ids in enumerate(tokens):
            padded[i, :len(ids)] = ids
        texts = data_lib.decode_predictions(self.tokenizer, padded) if tokens else []
        return [{**example, "prediction": text,
                 "parsed": jsonable(data_lib.get_task(example["task"]).parse_prediction(text))}
                for example, text in zip(examples, texts)]


def padded_rows(n: int, batch_size: int) -> int:
    """Rows of a batch holding `n` examples: the next power of two, at most `batch_size` (a
    short batch is not padded to a huge `batch_size`; few shapes, so few compiles)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


def _formats(task: str, example: Mapping[str, Any]) -> bool:
    try:
        data_lib.get_task(task).source(example)
        return True
    except (KeyError, ValueError):
        return False
