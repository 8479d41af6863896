"""Shared test setup: 4 fake CPU devices for data-parallel tests, and the data-dir skip marker."""

import jax
import pytest

# Must run before any JAX backend is initialised (pytest imports conftest first).
jax.config.update("jax_num_cpu_devices", 4)

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
