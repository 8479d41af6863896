"""Fixtures for the data-layer tests: one cached FilesSource (SST-2 train is read once) and the
real T5 tokenizer."""

import pytest

from compacter_jax.data import FilesSource


@pytest.fixture(scope="session")
def files_source(shared_data):
    """FilesSource over the shared data; its per-(task, split) cache lives for the session."""
    return FilesSource(shared_data)


@pytest.fixture(scope="session")
def tokenizer(t5_vocab):
    """The real 32k T5 tokenizer (never `T5Tokenizer(vocab_file=...)`: a 104-entry toy)."""
    try:
        from compacter_jax.tokenizer import load_tokenizer
    except ImportError:
        import transformers

        return transformers.T5Tokenizer.from_pretrained(str(t5_vocab))
    return load_tokenizer(str(t5_vocab))
