"""The T5 SentencePiece tokenizer (transformers' `T5Tokenizer`), loaded from local files only.

Note: `T5Tokenizer.from_pretrained(DIR)` gives the real 32,100-entry vocabulary;
`T5Tokenizer(vocab_file=...)` in transformers 5 silently builds a 104-entry toy vocabulary,
so it is never used here.
"""

from __future__ import annotations

from pathlib import Path

from compacter_jax.paths import DATA_DIR_ENV, t5_vocab_dir


def load_tokenizer(dir_or_hub_id: str | Path | None = None):
    """`transformers.T5Tokenizer` from a directory holding `spiece.model` (default: the shared
    T5 vocabulary, `compacter_jax.paths.t5_vocab_dir()`), or a Hub id already in the local HF
    cache. Raises FileNotFoundError saying what is missing and how to fix it."""
    from transformers import T5Tokenizer

    source = t5_vocab_dir() if dir_or_hub_id is None else dir_or_hub_id
    path = Path(source).expanduser()
    if path.is_dir() or dir_or_hub_id is None or path.exists():
        spm = path / "spiece.model"
        if not spm.is_file():
            hint = (f" (set ${DATA_DIR_ENV} to the data root holding t5_vocab/spiece.model)"
                    if dir_or_hub_id is None else "")
            raise FileNotFoundError(f"T5 tokenizer file {spm} not found{hint}")
        return _checked(T5Tokenizer.from_pretrained(str(path)), spm)
    # A Hub id: resolve spiece.model in the local cache first (transformers 5 would silently
    # fall back to the toy vocabulary when the file is missing).
    try:
        from huggingface_hub import hf_hub_download

        spm = hf_hub_download(str(source), "spiece.model", local_files_only=True)
    except Exception as e:  # not cached / offline / not a T5 repo
        raise FileNotFoundError(
            f"T5 tokenizer {str(source)!r} is neither a local directory with spiece.model nor "
            f"in the local HF cache ({type(e).__name__}: {e}); pass a directory holding "
            "spiece.model") from e
    return _checked(T5Tokenizer.from_pretrained(str(Path(spm).parent)), Path(spm))


def _checked(tokenizer, spm: Path):
    if len(tokenizer) < 1000:  # transformers' silent toy-vocabulary fallback
        raise ValueError(f"{spm} gave a {len(tokenizer)}-entry vocabulary; expected the real "
                         "T5 SentencePiece model (32,100 entries)")
    return tokenizer
