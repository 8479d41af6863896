"""T5Config: presets, HF config.json round trips (transformers 4 and 5 formats), bad values."""

from __future__ import annotations

import dataclasses

import pytest

from compacter_jax.models import PRESETS, T5Config, get_preset

transformers = pytest.importorskip("transformers")


def test_presets_have_real_hf_hyperparameters():
    expect = {  # d_model, d_ff, layers, heads, ff, tied
        "t5-small": (512, 2048, 6, 8, "relu", True),
        "t5-base": (768, 3072, 12, 12, "relu", True),
        "t5-large": (1024, 4096, 24, 16, "relu", True),
        "t5-v1_1-small": (512, 1024, 8, 6, "gated-gelu", False),
        "t5-v1_1-base": (768, 2048, 12, 12, "gated-gelu", False),
        "flan-t5-small": (512, 1024, 8, 6, "gated-gelu", False),
        "flan-t5-base": (768, 2048, 12, 12, "gated-gelu", False),
        "t5-tiny": (64, 128, 2, 2, "relu", True),
    }
    assert set(PRESETS) == set(expect)
    for name, (d, ff, layers, heads, proj, tied) in expect.items():
        c = PRESETS[name]
        assert (c.d_model, c.d_ff, c.num_layers, c.num_decoder_layers, c.num_heads,
                c.feed_forward_proj, c.tie_word_embeddings, c.scale_decoder_outputs) == \
            (d, ff, layers, layers, heads, proj, tied, tied), name
        assert c.vocab_size == 32128 and c.d_kv == (16 if name == "t5-tiny" else 64)
        assert c.relative_attention_num_buckets == 32 and c.layer_norm_epsilon == 1e-6
    assert get_preset("t5-base", scan_layers=True, dtype="bfloat16").scan_layers
    with pytest.raises(ValueError, match="unknown T5 preset"):
        get_preset("t5-huge")


def test_config_is_hashable_and_frozen():
    c = PRESETS["t5-small"]
    assert hash(c) == hash(c.replace())
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_roundtrip_through_transformers_config(name):
    ours = PRESETS[name]
    hf = transformers.T5Config(**ours.to_hf_dict())
    assert hf.scale_decoder_outputs == ours.scale_decoder_outputs
    assert T5Config.from_hf_dict(hf.to_dict()) == ours.replace(
        # transformers 5 ties every T5 it builds; scaling is what still differs
        tie_word_embeddings=True)
    assert T5Config.from_hf_dict(ours.to_hf_dict()) == ours


def test_transformers4_config_json_without_scale_field():
    v10 = {"d_model": 512, "feed_forward_proj": "relu", "tie_word_embeddings": True}
    v11 = {"d_model": 512, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
    assert T5Config.from_hf_dict(v10).scale_decoder_outputs
    c = T5Config.from_hf_dict(v11)
    assert not c.scale_decoder_outputs and not c.tie_word_embeddings
    # tie_word_embeddings absent: HF's default (tied, scaled)
    c = T5Config.from_hf_dict({})
    assert c.tie_word_embeddings and c.scale_decoder_outputs and c.num_decoder_layers == 6
    # transformers-5 fresh v1.1: forced tie, scaling kept separately
    c = T5Config.from_hf_dict({"tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert c.tie_word_embeddings and not c.scale_decoder_outputs
    # runtime options and list-valued eos
    c = T5Config.from_hf_dict({"eos_token_id": [1], "num_layers": 3}, scan_layers=True,
                              dtype="bfloat16")
    assert c.eos_token_id == 1 and c.num_decoder_layers == 3 and c.scan_layers


@pytest.mark.parametrize("bad, field", [
    ({"feed_forward_proj": "swish"}, "feed_forward_proj"),
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj"),
    ({"is_encoder_decoder": False}, "is_encoder_decoder"),
    ({"model_type": "bart"}, "model_type"),
])
def test_unsupported_hf_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        T5Config.from_hf_dict(bad)


def test_bad_runtime_values():
    with pytest.raises(ValueError, match="dtype"):
        T5Config(dtype="float64")
    with pytest.raises(ValueError, match="num_heads"):
        T5Config(num_heads=0)


def test_one_parser_of_model_names(tmp_path, monkeypatch):
    """`random:<preset>`, a folder, a shipped backbone, a Hub id: parsed in one place."""
    from pathlib import Path

    from compacter_jax.models.config import ModelSpec, is_random, parse_model_spec

    monkeypatch.setenv("COMPACTER_CHECKPOINTS_DIR", str(tmp_path / "shipped"))
    (tmp_path / "shipped" / "mini").mkdir(parents=True)
    (tmp_path / "shipped" / "mini" / "config.json").write_text("{}")
    (tmp_path / "local").mkdir()
    monkeypatch.chdir(tmp_path)
    assert parse_model_spec("random:t5-tiny") == ModelSpec("random", "t5-tiny")
    assert parse_model_spec("local") == ("path", Path("local"))          # exists: a folder
    assert parse_model_spec("./missing") == ("path", Path("missing"))    # written as a path
    assert parse_model_spec("~/x").where == Path.home() / "x"
    assert parse_model_spec("mini") == ("shipped", tmp_path / "shipped" / "mini")
    assert parse_model_spec("t5-base") == ("hub", "t5-base")
    assert parse_model_spec("google/flan-t5-base") == ("hub", "google/flan-t5-base")
    with pytest.raises(ValueError, match=r"unknown preset 't5-huge' in 'random:t5-huge'; "
                                         r"known: \[.*'t5-base'.*'t5-tiny'.*\]"):
        parse_model_spec("random:t5-huge")
    assert is_random("random:anything") and not is_random("t5-base")
