"""The scripts under examples/ run end to end (tiny settings)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.long  # ~10 s; tests/peft/test_inject.py trains/reloads an injected NNX LM by default
def test_nnx_gpt_compacter_example(tmp_path):
    out = _load("nnx_gpt_compacter").main(pretrain_steps=20, steps=20, out=str(tmp_path))
    assert out["frozen_unchanged"]
    assert out["reload_max_diff"] == 0.0
    assert sum(out["losses"][-5:]) / 5 < out["losses"][0]
    assert (tmp_path / "adapter" / "trainable_config.json").is_file()
