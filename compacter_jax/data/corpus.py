"""The unlabelled pretraining corpus: the text of the paper's *training* splits, tokenised,
concatenated with EOS and cut into fixed-length chunks (as seqio's `reduce_concat_tokens` +
`split_tokens`), with a held-out part for the loss check.

How it is built (`pretraining_corpus`), every step deterministic:

1. Documents: one per example of `paper_splits(task, source, data_seed)["train"]` for every
   task that loads from `source` (or the tasks asked for): its text fields (`document_fields`)
   joined by a space; no "sentence1:" prefixes, never a label. Optionally (`texts=`), the
   unlabelled text corpora under `<data_dir>/text/` (`text_documents`: news, the Brown corpus,
   movie and product reviews, speeches, web text), one field per ~200-word passage.
2. Decontamination: the validation and test splits of the paper are never in the corpus.
   Besides taking train splits only (SST-2's paper validation rows come from the official
   train file, so `paper_splits`' train already leaves them out), a document is dropped when
   one of its fields equals a validation/test text field of *any* available task, or shares a
   word `ngram`-gram with one (lower-cased, whitespace-normalised). This matters: MRPC train
   sentences recur in STS-B validation/test, RTE and WNLI train premises recur in their own
   validation sets. Unlabelled text passages are also dropped when they contain a whole
   evaluation text of >= `CONTAINED_MIN_WORDS` words (a quoted SST-2 sentence). Exact
   duplicate documents are kept once.
3. Order and held-out part: a `default_rng(data_seed)` permutation of the documents; the last
   `heldout_fraction` of them (at least one) are held out, and training documents that share
   a field or an n-gram with a held-out document are dropped too.
4. Tokens: each document tokenised without special tokens, followed by EOS, all concatenated
   in corpus order and cut into `chunk_length`-token rows (the final partial row is dropped,
   so every row has the same length); train and held-out documents are chunked separately.
   T5's C4 task concatenates documents with no separator; the EOS here marks document
   boundaries, as Hugging Face's `run_t5_mlm_flax.py` does (its tokenizer appends EOS).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from compacter_jax.data.files import DataError
from compacter_jax.data.sources import Source, make_source
from compacter_jax.data.splitting import paper_splits
from compacter_jax.data.tasks import Example, Task, get_task, task_names

log = logging.getLogger(__name__)

CONTAMINATION_NGRAM = 13
"""Word n-gram length of the overlap test (GPT-3's decontamination used 13-grams)."""
CONTAINED_MIN_WORDS = 8
"""Unlabelled text documents (paragraphs of books, reviews) are also dropped when they contain
a whole evaluation text of at least this many words (shorter than an n-gram, e.g. an SST-2
sentence quoted inside a movie review)."""
_TEXT_FIELDS = {
    # Free text only: COPA's `question` is the word "cause"/"effect"; WSC's span texts are
    # copies of words in `text`; ReCoRD's entities are a list taken from the passage.
    "copa": ("premise", "choice1", "choice2"),
    "wsc.fixed": ("text",),
    "record": ("passage", "query"),
    "multirc": ("paragraph", "question", "answer"),
}
_SPACE = re.compile(r"\s+")
TEXT_SOURCES = ("brown", "movie_reviews", "abc", "webtext", "inaugural", "state_union",
                "pros_cons", "product_reviews_1", "product_reviews_2")
"""The unlabelled English corpora under `<data_dir>/text/<name>.zip` (NLTK's zips; the
data's SOURCES.md says how each is laid out)."""
TEXT_DOCUMENT_WORDS = 200
"""Lines of a text file are packed into documents of at most about this many words, so that
a held-out or contaminated passage removes a paragraph, not a whole book."""
_TAG = re.compile(r"</?(Pros|Cons)>")


def document_fields(task: Task | str) -> tuple[str, ...]:
    """The example keys whose text goes into the corpus, in order."""
    task = get_task(task)
    return _TEXT_FIELDS.get(task.name, task.input_fields)


def _field_texts(task: Task, example: Example) -> list[str]:
    try:
        values = [example[f] for f in document_fields(task)]
    except KeyError as e:
        raise DataError(f"task {task.name}: example lacks text field {e.args[0]!r} "
                        f"(has {sorted(example)})") from None
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def normalize(text: str) -> str:
    """Lower-cased, whitespace-collapsed text: the key of the overlap tests."""
    return _SPACE.sub(" ", text.strip().lower())


def _ngrams(words: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i:i + n]) for i in range(len(words) - n + 1))


class OverlapIndex:
    """Normalised texts and their word n-grams; `overlaps(fields)` is True when a field equals
    an indexed text or shares an n-gram with one; `contains(fields)` also when a field holds a
    whole shorter indexed text (of `CONTAINED_MIN_WORDS` words or more)."""

    def __init__(self, texts: Iterable[str], ngram: int = CONTAMINATION_NGRAM):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.exact: set[str] = set()
        self.grams: set[tuple[str, ...]] = set()
        # Texts shorter than an n-gram, by their first CONTAINED_MIN_WORDS words.
        self.short: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        key = normalize(text)
        self.exact.add(key)
        words = key.split(" ")
        self.grams.update(_ngrams(words, self.ngram))
        if CONTAINED_MIN_WORDS <= len(words) < self.ngram:
            self.short.setdefault(tuple(words[:CONTAINED_MIN_WORDS]), set()).add(tuple(words))

    def overlaps(self, fields: Iterable[str]) -> bool:
        for text in fields:
            key = normalize(text)
            if key in self.exact or any(g in self.grams
                                        for g in _ngrams(key.split(" "), self.ngram)):
                return True
        return False

    def contains(self, fields: Iterable[str]) -> bool:
        """`overlaps`, or a field holds a whole indexed text of CONTAINED_MIN_WORDS or more
        words (for long documents, which may quote a short evaluation sentence)."""
        fields = list(fields)
        if self.overlaps(fields):
            return True
        for text in fields:
            words = normalize(text).split(" ")
            for i, head in enumerate(_ngrams(words, CONTAINED_MIN_WORDS)):
                for whole in self.short.get(head, ()):
                    if tuple(words[i:i + len(whole)]) == whole:
                        return True
        return False


@dataclasses.dataclass(frozen=True, eq=False)
class CorpusDocuments:
    """The decontaminated documents of the corpus, in corpus order (steps 1-3 of the module
    docstring); the last `num_heldout` are the held-out part.

    Attributes:
      tasks: tasks whose training text is in the corpus, in registry order.
      fields: each document's text fields (`document_fields` order); `texts` joins them.
      task_of: the task of each document.
      num_heldout: number of held-out documents (the end of `fields`).
      stats: per task {"rows", "contaminated", "duplicates", "heldout_overlap", "documents",
        "heldout"} (rows read; dropped as overlapping evaluation text, as duplicates, as
        overlapping held-out text; kept training and held-out documents), and totals.
      data_seed: seed of the paper splits and of the document order.
    """

    tasks: tuple[str, ...]
    fields: tuple[tuple[str, ...], ...]
    task_of: tuple[str, ...]
    num_heldout: int
    stats: dict[str, Any]
    data_seed: int

    @property
    def texts(self) -> tuple[str, ...]:
        """Each document's text: its fields joined by a space."""
        return tuple(" ".join(f) for f in self.fields)

    @property
    def train_texts(self) -> tuple[str, ...]:
        return self.texts[:len(self.fields) - self.num_heldout]

    @property
    def heldout_texts(self) -> tuple[str, ...]:
        return self.texts[len(self.fields) - self.num_heldout:]


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainingCorpus:
    """The documents and their token chunks (see the module docstring).

    Attributes:
      documents: the `CorpusDocuments` the chunks were cut from.
      train_chunks / heldout_chunks: int32 [N, chunk_length] / [M, chunk_length].
    """

    documents: CorpusDocuments
    train_chunks: np.ndarray
    heldout_chunks: np.ndarray

    @property
    def chunk_length(self) -> int:
        return int(self.train_chunks.shape[1])

    def heldout_fingerprint(self) -> str:
        return chunks_fingerprint(self.heldout_chunks)

    def summary(self) -> dict[str, Any]:
        """JSON record of what the corpus holds (for READMEs and run summaries)."""
        docs = self.documents
        return {"tasks": list(docs.tasks), "data_seed": docs.data_seed,
                "chunk_length": self.chunk_length,
                "train_documents": len(docs.train_texts), "heldout_documents": docs.num_heldout,
                "train_chunks": int(len(self.train_chunks)),
                "heldout_chunks": int(len(self.heldout_chunks)),
                "train_tokens": int(self.train_chunks.size),
                "heldout_tokens": int(self.heldout_chunks.size),
                "heldout_sha256": self.heldout_fingerprint(), **docs.stats}


def chunks_fingerprint(chunks: np.ndarray) -> str:
    """sha256 of int32 token chunks (little-endian bytes): names a held-out text exactly."""
    return hashlib.sha256(np.ascontiguousarray(chunks, "<i4").tobytes()).hexdigest()


def _entry_lines(source: str, name: str, raw: bytes) -> list[str] | None:
    """The text lines of one zip entry of text source `source` (None: not a text entry)."""
    base = name.rsplit("/", 1)[-1]
    if name.endswith("/") or base.upper().startswith(("README", "LICENSE", "CONTENTS")):
        return None
    if source == "brown" and (base == "cats.txt" or not re.fullmatch(r"c[a-r]\d\d", base)):
        return None
    if source == "pros_cons" and not base.startswith("Integrated"):
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = []
    for line in text.splitlines():
        if source == "brown":  # word/tag tokens: keep the word
            line = " ".join(t.rsplit("/", 1)[0] for t in line.split())
        elif source == "pros_cons":
            line = _TAG.sub(" ", line)
        elif source.startswith("product_reviews"):
            if line.startswith(("*", "[t]")) or "##" not in line:
                continue
            # Text after the first "##" (a few original lines hold several annotated
            # sentences; their inner annotations stay).
            line = line.split("##", 1)[1]
        lines.append(line.strip())
    return lines


def _pack_lines(lines: Sequence[str], max_words: int) -> list[str]:
    """Consecutive non-empty lines joined into documents of <= max_words words (a longer
    line is a document of its own); blank lines end a document."""
    docs, current, words = [], [], 0
    for line in [*lines, ""]:
        n = len(line.split())
        if current and (n == 0 or words + n > max_words):
            docs.append(" ".join(current))
            current, words = [], 0
        if n:
            current.append(line)
            words += n
    return docs


def text_documents(data_dir, sources: Sequence[str] = TEXT_SOURCES, *,
                   max_words: int = TEXT_DOCUMENT_WORDS) -> dict[str, list[str]]:
    """{source: documents} of the unlabelled text corpora in `<data_dir>/text/<source>.zip`.

    Every zip entry is read in name order; its lines (cleaned as the data's SOURCES.md says:
    Brown's POS tags, the pros/cons tags and the product-review annotations removed) are packed
    by `_pack_lines` into documents of at most `max_words` words. No label is ever read (the
    movie reviews' pos/neg folder names are not used).
    """
    from pathlib import Path

    out = {}
    for source in sources:
        if source not in TEXT_SOURCES:
            raise ValueError(f"unknown text source {source!r}; known: {', '.join(TEXT_SOURCES)}")
        path = Path(data_dir) / "text" / f"{source}.zip"
        if not path.is_file():
            raise DataError(f"text source {source}: {path} not found (set $COMPACTER_DATA_DIR "
                            "to the data root holding text/, or drop it from text_sources)")
        docs: list[str] = []
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                lines = _entry_lines(source, name, zf.read(name))
                if lines is not None:
                    docs.extend(_pack_lines(lines, max_words))
        out[source] = docs
    return out


def available_tasks(source: Source, tasks: Sequence[str] | None = None, *, data_seed: int = 42
                    ) -> dict[str, dict[str, list[Example]]]:
    """{task: paper splits} for `tasks` (errors raise), or for every registry task whose
    splits load from `source` (tasks whose files are missing are skipped, and logged)."""
    out = {}
    for name in (tasks if tasks is not None else task_names()):
        task = get_task(name)
        try:
            out[task.name] = paper_splits(task, source, data_seed=data_seed)
        except DataError as e:
            if tasks is not None:
                raise
            log.info("pretraining corpus: %s not available (%s)", task.name,
                     str(e).splitlines()[0][:160])
    if not out:
        raise DataError(f"no task has local training data in {source}; set "
                        "$COMPACTER_DATA_DIR to the folder holding glue/ and superglue/")
    return out


def evaluation_texts(splits: dict[str, dict[str, list[Example]]]) -> list[str]:
    """Every text field of every paper validation and test example in `splits`."""
    texts = []
    for name, by_split in splits.items():
        task = get_task(name)
        for split in ("validation", "test"):
            for ex in by_split[split]:
                texts.extend(_field_texts(task, ex))
    return texts


def concat_and_chunk(token_lists: Iterable[Sequence[int]], chunk_length: int,
                     eos_id: int = 1) -> np.ndarray:
    """Documents' ids, each followed by EOS, concatenated and cut into int32
    [total // chunk_length, chunk_length] rows (the remainder is dropped)."""
    if chunk_length < 1:
        raise ValueError(f"chunk_length must be >= 1, got {chunk_length}")
    pieces = [np.asarray(list(ids) + [eos_id], np.int32) for ids in token_lists]
    stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    rows = len(stream) // chunk_length
    return stream[:rows * chunk_length].reshape(rows, chunk_length)


def tokenize_documents(tokenizer, texts: Sequence[str], batch: int = 4096
                       ) -> list[list[int]]:
    """Token ids of each text, no special tokens (the fast backend when there is one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[list[int]] = []
    for start in range(0, len(texts), batch):
        part = list(texts[start:start + batch])
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            ids.extend(e.ids for e in backend.encode_batch_fast(part, add_special_tokens=False))
        else:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    return ids


def chunk_documents(texts: Sequence[str], tokenizer, chunk_length: int) -> np.ndarray:
    """Tokenised texts, each followed by EOS, concatenated and cut: int32 [N, chunk_length]."""
    return concat_and_chunk(tokenize_documents(tokenizer, texts), chunk_length,
                            int(tokenizer.eos_token_id))


def corpus_documents(source: Source | None = None, tasks: Sequence[str] | None = None, *,
                     data_seed: int = 42, heldout_fraction: float = 0.01,
                     ngram: int = CONTAMINATION_NGRAM,
                     texts: dict[str, Sequence[str]] | None = None) -> CorpusDocuments:
    """Steps 1-3 of the module docstring (no tokenizer needed). Args:

      source: where the tasks are read (default: the local files, `make_source("files")`).
      tasks: task names (default: every task whose training data loads from `source`).
      data_seed: seed of `paper_splits` and of the document order.
      heldout_fraction: share of documents held out (the last ones in corpus order).
      ngram: word n-gram length of the overlap test.
      texts: extra unlabelled documents, {source name: texts} (e.g. `text_documents(...)`),
        after the tasks' documents and filtered the same way (one field each; their stats
        are keyed "text:<source>").
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    source = make_source("files") if source is None else source
    everything = available_tasks(source, data_seed=data_seed)
    if tasks is None:
        chosen = everything
    else:  # decontaminate against every available task, not just the chosen ones
        chosen = available_tasks(source, tasks, data_seed=data_seed)
        everything = {**everything, **chosen}
    evaluation = OverlapIndex(evaluation_texts(everything), ngram)

    docs: list[tuple[str, list[str]]] = []  # (task, fields)
    seen: set[tuple[str, ...]] = set()
    stats: dict[str, Any] = {"per_task": {}}
    for name, by_split in chosen.items():
        task = get_task(name)
        counts = {"rows": len(by_split["train"]), "contaminated": 0, "duplicates": 0,
                  "heldout_overlap": 0, "documents": 0, "heldout": 0}
        for ex in by_split["train"]:
            fields = _field_texts(task, ex)
            if not fields:
                continue
            key = tuple(normalize(f) for f in fields)
            if evaluation.overlaps(fields):
                counts["contaminated"] += 1
            elif key in seen:
                counts["duplicates"] += 1
            else:
                seen.add(key)
                docs.append((task.name, fields))
        stats["per_task"][task.name] = counts
    for name, texts_of in (texts or {}).items():
        label = f"text:{name}"
        counts = {"rows": len(texts_of), "contaminated": 0, "duplicates": 0,
                  "heldout_overlap": 0, "documents": 0, "heldout": 0}
        for text in texts_of:
            if not text.strip():
                continue
            fields = [text.strip()]
            key = (normalize(text),)
            if evaluation.contains(fields):
                counts["contaminated"] += 1
            elif key in seen:
                counts["duplicates"] += 1
            else:
                seen.add(key)
                docs.append((label, fields))
        stats["per_task"][label] = counts
    if len(docs) < 2:
        raise DataError(f"only {len(docs)} clean training documents in tasks "
                        f"{list(chosen)}; need at least 2 to hold one out")

    order = np.random.default_rng(data_seed).permutation(len(docs))
    docs = [docs[i] for i in order]
    num_heldout = max(1, int(round(heldout_fraction * len(docs))))
    train, heldout = docs[:-num_heldout], docs[-num_heldout:]
    heldout_index = OverlapIndex((f for _, fields in heldout for f in fields), ngram)
    kept = []
    for task_name, fields in train:
        if heldout_index.overlaps(fields):
            stats["per_task"][task_name]["heldout_overlap"] += 1
        else:
            kept.append((task_name, fields))
            stats["per_task"][task_name]["documents"] += 1
    for task_name, _ in heldout:
        stats["per_task"][task_name]["heldout"] += 1
    for key in ("rows", "contaminated", "duplicates", "heldout_overlap"):
        stats[f"total_{key}"] = sum(c[key] for c in stats["per_task"].values())
    docs = kept + heldout
    return CorpusDocuments(tasks=tuple(chosen), fields=tuple(tuple(f) for _, f in docs),
                           task_of=tuple(t for t, _ in docs), num_heldout=len(heldout),
                           stats=stats, data_seed=data_seed)


def pretraining_corpus(source: Source | None = None, tasks: Sequence[str] | None = None, *,
                       tokenizer=None, chunk_length: int = 141, data_seed: int = 42,
                       heldout_fraction: float = 0.01, ngram: int = CONTAMINATION_NGRAM,
                       texts: dict[str, Sequence[str]] | None = None,
                       documents: CorpusDocuments | None = None) -> PretrainingCorpus:
    """`corpus_documents(...)` tokenised and chunked (step 4 of the module docstring).

    tokenizer: a T5 tokenizer (default: `compacter_jax.tokenizer.load_tokenizer()`);
    chunk_length: raw tokens per chunk (`SpanCorruption.tokens_length`: 141 -> 128 inputs).
    documents: already built `corpus_documents` (e.g. to train a tokenizer on them first);
    other arguments as `corpus_documents`.
    """
    docs = documents if documents is not None else corpus_documents(
        source, tasks, data_seed=data_seed, heldout_fraction=heldout_fraction, ngram=ngram,
        texts=texts)
    if tokenizer is None:
        from compacter_jax.tokenizer import load_tokenizer
        tokenizer = load_tokenizer()
    train_chunks = chunk_documents(docs.train_texts, tokenizer, chunk_length)
    heldout_chunks = chunk_documents(docs.heldout_texts, tokenizer, chunk_length)
    if len(train_chunks) == 0 or len(heldout_chunks) == 0:
        raise DataError(f"tasks {list(docs.tasks)} give {len(train_chunks)} training and "
                        f"{len(heldout_chunks)} held-out chunks of {chunk_length} tokens; "
                        "use more tasks, a larger heldout_fraction or shorter chunks")
    return PretrainingCorpus(docs, train_chunks, heldout_chunks)
