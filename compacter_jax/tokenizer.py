"""The T5 SentencePiece tokenizer (transformers' `T5Tokenizer`) that goes with a model.

A model's own tokenizer comes first, as in `transformers`: the `spiece.model` (or
`tokenizer.json`) of its checkpoint folder or Hub repo (`tokenizer_for_model`). The shared T5
vocabulary under `$COMPACTER_DATA_DIR/t5_vocab` is used only when asked for (an explicit
tokenizer setting) or when the model has none (a `random:` preset, a folder holding only
config.json and weights).

Note: `T5Tokenizer.from_pretrained(DIR)` gives the real vocabulary; `T5Tokenizer(vocab_file=...)`
in transformers 5 silently builds a 104-entry toy vocabulary, so it is never used here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from compacter_jax import hub
from compacter_jax.paths import DATA_DIR_ENV, inside, locate, t5_vocab_dir

log = logging.getLogger(__name__)
# The files a T5 tokenizer may come in (spiece.model: SentencePiece; tokenizer.json: fast).
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def has_tokenizer(folder: str | Path | None) -> bool:
    """True when `folder` holds a tokenizer (`spiece.model` or `tokenizer.json`)."""
    return folder is not None and any((Path(folder) / f).is_file()
                                      for f in ("spiece.model", "tokenizer.json"))


def load_tokenizer(dir_or_hub_id: str | Path | None = None, *, vocab_size: int | None = None,
                   revision: str | None = None, local_files_only: bool = False):
    """`transformers.T5Tokenizer` from a directory holding `spiece.model` (or
    `tokenizer.json`), a backbone shipped with the package ("t5-mini-glue"), a Hub repo id (short names such as "t5-base" included; downloaded into
    the HF cache when missing, as `compacter_jax.hub`), or None: the shared T5 vocabulary
    (`compacter_jax.paths.t5_vocab_dir()`).

    Args:
      vocab_size: the model's vocabulary size; a tokenizer with more entries is an error (its
        ids would index past the embedding).
      revision, local_files_only: for a Hub repo.
    Raises:
      FileNotFoundError saying what is missing and how to fix it; ValueError for a tokenizer
      that does not fit `vocab_size`; `compacter_jax.hub`'s errors for a Hub repo.
    """
    if dir_or_hub_id is None:
        kind, path = "path", t5_vocab_dir()
    else:  # a folder, a backbone shipped with the package ("t5-mini-glue") or a Hub id
        kind, path = locate(dir_or_hub_id)
    if kind == "hub":
        repo_id = hub.repo_id_of(path)  # fetch its tokenizer files
        path = hub.snapshot(repo_id, revision=revision, local_files_only=local_files_only,
                            allow_patterns=TOKENIZER_FILES)
        if not has_tokenizer(path):
            raise FileNotFoundError(f"Hub repo {repo_id!r} has no spiece.model or "
                                    "tokenizer.json: pass a tokenizer directory")
    if not has_tokenizer(path):
        hint = (f" (set ${DATA_DIR_ENV} to the data root holding t5_vocab/spiece.model, or use "
                "the model's own tokenizer)" if dir_or_hub_id is None else "")
        raise FileNotFoundError(f"T5 tokenizer file {path / 'spiece.model'} not found{hint}")
    return _checked(_from_folder(path), path, vocab_size)


def tokenizer_for_model(model_folder: str | Path | None, override: str | Path | None = None,
                        *, vocab_size: int | None = None, model: str = ""):
    """The tokenizer a run of a model uses: `override` when given (a directory or Hub id, e.g.
    the shared vocabulary), else the model folder's own (`spiece.model` / `tokenizer.json`),
    else (a `random:` preset, a folder without a tokenizer) the shared T5 vocabulary.

    Args:
      model_folder: the model's local folder (`compacter_jax.models.hf_io.model_dir`), or None.
      override: an explicit tokenizer directory or Hub id ("" or None: none).
      vocab_size: the model's vocabulary size (checked, see `load_tokenizer`).
      model: the model's name, for messages.
    """
    if override:
        return load_tokenizer(override, vocab_size=vocab_size)
    if has_tokenizer(model_folder):
        return load_tokenizer(Path(model_folder), vocab_size=vocab_size)
    log.info("model %s ships no tokenizer: using the shared T5 vocabulary (%s)",
             model or model_folder, t5_vocab_dir())
    return load_tokenizer(None, vocab_size=vocab_size)


def _from_folder(path: Path):
    from transformers import T5Tokenizer

    for name in TOKENIZER_FILES:  # an untrusted folder: its files must stay inside it
        if (path / name).exists():
            inside(path, name, str(path))
    return T5Tokenizer.from_pretrained(str(path))


def _checked(tokenizer, path: Path, vocab_size: int | None):
    spm = path / "spiece.model" if (path / "spiece.model").is_file() else path
    if len(tokenizer) < 1000:  # transformers' silent toy-vocabulary fallback
        raise ValueError(f"{spm} gave a {len(tokenizer)}-entry vocabulary; expected a real "
                         "T5 SentencePiece model (the public one has 32,100 entries)")
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer {spm} has {len(tokenizer):,} entries but the model's "
                         f"vocab_size is {vocab_size:,}: its ids would index past the "
                         "embedding; use the model's own tokenizer")
    return tokenizer
