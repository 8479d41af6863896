r"""Train a T5-style SentencePiece vocabulary on the pretraining corpus.

  python -m experiments.train_tokenizer --out DIR [--vocab_size 8000] [--text_sources all]

Writes `DIR/spiece.model`: a unigram SentencePiece model with T5's conventions (pad 0, EOS 1,
unk 2, no BOS; NFKC normalisation), trained on the *training* documents of
`compacter_jax.data.corpus.corpus_documents` (never the held-out or evaluation text).
`transformers.T5Tokenizer.from_pretrained(DIR)` (`compacter_jax.tokenizer.load_tokenizer`)
then appends the 100 `<extra_id_k>` sentinels, `<extra_id_0>` being the last id
(`vocab_size + 99`), as T5's own vocabulary does.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Iterable

from compacter_jax.atomic import atomic_write
from experiments import tool_cli

SPIECE = "spiece.model"


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, *, vocab_size: int = 8000,
                        character_coverage: float = 0.9995, num_threads: int = 1) -> Path:
    """Trains the unigram model on `texts` (one document per item) and writes
    `out_dir/spiece.model` atomically. Returns its path.

    Args:
      texts: training documents (any iterable of str; empty ones are skipped).
      vocab_size: SentencePiece pieces, the 3 special ones included (the tokenizer then has
        vocab_size + 100 entries).
      character_coverage: share of characters covered by single-character pieces (rare
        characters map to unk).
      num_threads: trainer threads (1: the shared CPU; also keeps the result deterministic).
    """
    import sentencepiece as spm

    if vocab_size < 100:
        raise ValueError(f"vocab_size must be >= 100, got {vocab_size}")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t.strip()), model_writer=buffer,
        vocab_size=vocab_size, model_type="unigram", character_coverage=character_coverage,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", normalization_rule_name="nmt_nfkc", max_sentence_length=16384,
        num_threads=num_threads, minloglevel=2)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write(out_dir / SPIECE, buffer.getvalue())


def corpus_training_texts(*, data_dir: str | None = None, tasks: str = "",
                          text_sources: str = "all", data_seed: int = 42,
                          heldout_fraction: float = 0.01) -> list[str]:
    """The training documents of the pretraining corpus (as `experiments.pretrain` builds it
    from the same settings)."""
    from compacter_jax.data import make_source
    from compacter_jax.data.corpus import corpus_documents, text_documents
    from compacter_jax.paths import data_dir as default_data_dir

    names = parse_text_sources(text_sources)
    root = data_dir or default_data_dir()
    texts = text_documents(root, names) if names else None
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] or None
    docs = corpus_documents(make_source("files", data_dir=data_dir or None), task_list,
                            data_seed=data_seed, heldout_fraction=heldout_fraction,
                            texts=texts)
    return list(docs.train_texts)


def parse_text_sources(spec: str) -> tuple[str, ...]:
    """"" -> none, "all" -> every `corpus.TEXT_SOURCES`, else a comma-separated list."""
    from compacter_jax.data.corpus import TEXT_SOURCES

    spec = spec.strip()
    if spec == "all":
        return TEXT_SOURCES
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = tool_cli.parser("experiments.train_tokenizer", __doc__)
    parser.add_argument("--out", required=True, help="directory for spiece.model")
    parser.add_argument("--vocab_size", type=tool_cli.positive_int, default=8000,
                        help="SentencePiece pieces, the 3 special ones included (>= 100)")
    parser.add_argument("--text_sources", default="all")
    parser.add_argument("--tasks", default="")
    parser.add_argument("--data_seed", type=int, default=42)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.vocab_size < 100:  # before the corpus is read
        raise ValueError(f"--vocab_size {args.vocab_size}: SentencePiece needs at least 100 "
                         "pieces (T5's own: 32000)")
    texts = corpus_training_texts(tasks=args.tasks, text_sources=args.text_sources,
                                  data_seed=args.data_seed)
    path = train_sentencepiece(texts, args.out, vocab_size=args.vocab_size)
    print(f"{path}: {args.vocab_size} pieces from {len(texts):,} documents")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_cli.run(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
