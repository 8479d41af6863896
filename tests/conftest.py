"""Shared test setup: 4 fake CPU devices for data-parallel tests, the data-dir skip marker, one
cached FilesSource (SST-2 train is read once) and the real T5 tokenizer."""

import os

# Tests never reach the Hub: only the fake Hub on 127.0.0.1 (tests/hub_server.py), in
# subprocesses that set HF_ENDPOINT and HF_HUB_OFFLINE=0 themselves.
os.environ["HF_HUB_OFFLINE"] = "1"

import jax  # noqa: E402
import pytest

# Must run before any JAX backend is initialised (pytest imports conftest first).
jax.config.update("jax_num_cpu_devices", 4)
# The suite is compile-bound (tiny models, few steps): XLA's optimisation passes cost more than
# they save. Every comparison in a test runs under the same flags, so exactness is unaffected.
jax.config.update("jax_disable_most_optimizations", True)

from compacter_jax.paths import data_dir, t5_vocab_dir  # noqa: E402


@pytest.fixture(scope="session")
def shared_data():
    """The shared data root; skips the test with the reason when it is absent."""
    root = data_dir()
    if not (root / "glue").is_dir():
        pytest.skip(f"shared data not found at {root} (set COMPACTER_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def t5_vocab():
    """Directory with the real T5 spiece.model; skips when absent."""
    vocab = t5_vocab_dir()
    if not (vocab / "spiece.model").is_file():
        pytest.skip(f"T5 vocabulary not found at {vocab}/spiece.model (set COMPACTER_DATA_DIR)")
    return vocab


@pytest.fixture(scope="session")
def files_source(shared_data):
    """FilesSource over the shared data; its per-(task, split) cache lives for the session."""
    from compacter_jax.data import FilesSource

    return FilesSource(shared_data)


@pytest.fixture(scope="session")
def tokenizer(t5_vocab):
    """The real 32k T5 tokenizer (never `T5Tokenizer(vocab_file=...)`: a 104-entry toy)."""
    from compacter_jax.tokenizer import load_tokenizer

    return load_tokenizer(str(t5_vocab))


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.long` tests take minutes; they run only with COMPACTER_LONG_TESTS=1."""
    if os.environ.get("COMPACTER_LONG_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="several minutes; set COMPACTER_LONG_TESTS=1 to run (a fast version runs by default)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)
