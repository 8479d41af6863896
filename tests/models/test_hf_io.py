"""Checkpoint I/O without torch: random presets, PEFT params, scan, and clear errors."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from t5_reference import random_params

from compacter_jax.models import (T5Config, T5Hooks, from_pretrained, save_pretrained,
                                  stack_blocks)
from compacter_jax.models.hf_io import is_backbone_path
from compacter_jax.models.t5 import T5ForConditionalGeneration

CFG = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=1,
               num_heads=2, relative_attention_num_buckets=8,
               relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, scale_decoder_outputs=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    params = random_params(T5ForConditionalGeneration(CFG))
    path = tmp_path_factory.mktemp("ckpt")
    save_pretrained(path, CFG, params)
    return path, params


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _equal(a, b):
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_save_then_load_is_exact_and_scan_stacks(checkpoint):
    path, params = checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and cfg["feed_forward_proj"] == "gated-gelu"
    tensors = load_file(path / "model.safetensors")
    assert tensors["encoder.block.1.layer.0.SelfAttention.q.weight"].shape == (8, 16)  # [out,in]
    assert tensors["lm_head.weight"].shape == (64, 16)
    model, loaded = from_pretrained(str(path))
    assert model.config == CFG and _equal(loaded, params)
    model, scanned = from_pretrained(str(path), scan_layers=True, dtype="bfloat16")
    assert model.config.scan_layers and model.config.dtype == "bfloat16"
    q = scanned["encoder"]["blocks"]["layer_0"]["SelfAttention"]["q"]["kernel"]
    np.testing.assert_array_equal(q[1], params["encoder"]["block_1"]["layer_0"]["SelfAttention"]
                                  ["q"]["kernel"])
    assert q.dtype == np.float32  # params stay float32 with bf16 compute


def test_random_preset():
    model, params = from_pretrained("random:t5-tiny", rng=jax.random.PRNGKey(1))
    assert model.config.d_model == 64 and params["shared"]["embedding"].shape == (32128, 64)
    with pytest.raises(ValueError, match="unknown preset"):
        from_pretrained("random:t5-gigantic")


def test_backbone_path_classification():
    assert is_backbone_path(("encoder", "blocks", "layer_1", "layer_norm", "scale"), CFG)
    assert is_backbone_path(("decoder", "block_0", "layer_1", "EncDecAttention", "o", "kernel"),
                            CFG)
    assert not is_backbone_path(("encoder", "block_0", "layer_1", "adapter", "down", "kernel"),
                                CFG)
    assert not is_backbone_path(("encoder", "block_0", "layer_0", "SelfAttention", "q_delta",
                                 "bias"), CFG)
    assert not is_backbone_path(("peft_root", "rule"), CFG)
    assert not is_backbone_path(("encoder", "prompt", "embedding"), CFG)


def test_missing_config_json(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(d))


def test_missing_weights_file(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(str(d))


def test_missing_weight_key_is_named(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    del tensors["decoder.block.0.layer.2.DenseReluDense.wi_1.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"decoder\.block\.0\.layer\.2\.DenseReluDense\.wi_1"):
        from_pretrained(str(d))


def test_shape_mismatch_names_key_and_shapes(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    tensors["encoder.block.0.layer.0.SelfAttention.k.weight"] = np.zeros((8, 15), np.float32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"SelfAttention\.k\.weight.*\(8, 16\).*\(8, 15\)"):
        from_pretrained(str(d))


def test_corrupt_safetensors_names_file(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="model.safetensors"):
        from_pretrained(str(d))


def test_unsupported_feed_forward_proj(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["feed_forward_proj"] = "swish"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="feed_forward_proj"):
        from_pretrained(str(d))


def test_uncached_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local HF cache"):
        from_pretrained("t5-small")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_pretrained(str(tmp_path / "nope"))


class _Bias(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, shared):
        return self.param("bias", nn.initializers.normal(1.0), (self.features,)) + 0 * x[..., :1]


@dataclasses.dataclass(frozen=True)
class _BiasHooks(T5Hooks):
    def projection_delta(self, site, projection, in_features, out_features, name):
        return _Bias(out_features, name=name) if projection == "wo" else None


@pytest.mark.parametrize("scan", [False, True])
def test_hook_params_are_fresh_and_backbone_from_checkpoint(checkpoint, scan):
    path, params = checkpoint
    model, loaded = from_pretrained(str(path), hooks=_BiasHooks(), scan_layers=scan,
                                    rng=jax.random.PRNGKey(5))
    flat = traverse_util.flatten_dict(loaded, sep="/")
    deltas = {k: v for k, v in flat.items() if "wo_delta" in k}
    assert len(deltas) == (2 if scan else 3)  # one per stack when scanned, else per block
    assert all(float(np.abs(v).max()) > 0 for v in deltas.values())  # initialised, not zeros
    backbone = {k: v for k, v in flat.items() if k not in deltas}
    expected = traverse_util.flatten_dict(stack_blocks(params) if scan else params, sep="/")
    assert backbone.keys() == expected.keys()
    assert all(np.array_equal(backbone[k], expected[k]) for k in expected)
    # saving drops the hook params
    assert set(load_file(save_pretrained(path.parent / f"hooked{scan}", model.config, loaded)
                         / "model.safetensors")) == set(load_file(path / "model.safetensors"))


# ---- issue 12: files as saved, bad config.json, corrupt weights, path vs Hub id ----

def test_saved_files_get_the_umask_mode_not_0600(checkpoint, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        out = save_pretrained(tmp_path / "saved", CFG, checkpoint[1])
    finally:
        os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}


def test_a_failed_save_keeps_the_old_files_and_no_temporary(checkpoint, tmp_path, monkeypatch):
    out = _copy(checkpoint[0], tmp_path / "saved")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("compacter_jax.models.hf_io.save_file", killed)   # the weights
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(out, CFG, checkpoint[1])
    monkeypatch.undo()
    monkeypatch.setattr("os.fsync", killed)                               # config.json
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(out, CFG, checkpoint[1])
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", r"config.json: config.json must hold a JSON object of T5 settings, got a JSON "
               r"array"),
    ('{"num_layers": "two"}', r"config.json: config.json field 'num_layers' must be an "
                              r"integer, got 'two'"),
    ('{"d_model": 64.5}', r"field 'd_model' must be an integer, got 64.5"),
    ('{"tie_word_embeddings": "yes"}', r"field 'tie_word_embeddings' must be true or false"),
    ('{"num_heads": 0}', r"config.json: T5Config.num_heads must be positive"),
    ("{oops", r"corrupt .*config.json: not valid JSON"),
])
def test_bad_config_json_names_file_and_field(checkpoint, tmp_path, content, message):
    from compacter_jax.models.hf_io import load_config

    d = _copy(checkpoint[0], tmp_path / "c")
    (d / "config.json").write_text(content)
    with pytest.raises(ValueError, match=message) as raised:
        load_config(str(d))
    assert str(d / "config.json") in str(raised.value)
    with pytest.raises(ValueError, match=message):
        from_pretrained(str(d))


def test_nonfinite_weights_are_refused_naming_the_key(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    tensors["decoder.final_layer_norm.weight"][3] = np.inf
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"'decoder.final_layer_norm.weight' in .*"
                                         r"model.safetensors holds 1 NaN/inf values"):
        from_pretrained(str(d))


class _Picky(nn.Module):
    want: int

    @nn.compact
    def __call__(self, x, shared):
        if x.shape[-1] != self.want:
            raise ValueError(f"this adapter needs d_model {self.want}, got {x.shape[-1]}")
        return x


@dataclasses.dataclass(frozen=True)
class _PickyHooks(T5Hooks):
    want: int = 16

    def sublayer_adapter(self, site, d_model, name):
        return _Picky(self.want, name=name)


def test_wrong_d_model_is_a_shape_mismatch_before_a_hook_error(checkpoint, tmp_path):
    d = _copy(checkpoint[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "d_model": 18}))  # weights have 16
    with pytest.raises(ValueError, match=r"shape mismatch for .*expected \(.*18.*\) from "
                                         r"config.json, found"):
        from_pretrained(str(d), hooks=_PickyHooks(want=16))
    with pytest.raises(ValueError, match="needs d_model 12, got 16"):  # a genuine hook error
        from_pretrained(str(checkpoint[0]), hooks=_PickyHooks(want=12))


def test_only_an_uncached_hub_id_is_model_not_cached(tmp_path, monkeypatch):
    from compacter_jax.models.hf_io import ModelNotCachedError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotCachedError):
        from_pretrained("t5-large")
    for path in (tmp_path / "nope", tmp_path):  # a missing path; a dir without config.json
        with pytest.raises(FileNotFoundError) as raised:
            from_pretrained(str(path))
        assert not isinstance(raised.value, ModelNotCachedError)


def test_load_config_checks_the_weight_headers_only_when_asked(checkpoint, tmp_path):
    from compacter_jax.models.hf_io import load_config

    d = _copy(checkpoint[0], tmp_path / "c")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated header
    assert load_config(str(d)) == load_config(str(checkpoint[0]))  # config.json alone
    with pytest.raises(ValueError, match=r"cannot read safetensors file .*model.safetensors "
                                         r"\(corrupt or truncated\?\)"):
        load_config(str(d), check_weights=True)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or "
                                                r"model.safetensors.index.json in"):
        load_config(str(d), check_weights=True)


def test_a_backbone_pretrained_here_loads_by_its_folder_name(checkpoint, tmp_path, monkeypatch):
    """`from_pretrained("t5-mini-glue")` reads $COMPACTER_CHECKPOINTS_DIR/t5-mini-glue (default:
    the repository's checkpoints/) before asking the HF cache; other names still go to the cache."""
    path, params = checkpoint
    _copy(path, tmp_path / "my-t5")
    monkeypatch.setenv("COMPACTER_CHECKPOINTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    _, loaded = from_pretrained("my-t5")
    assert _equal(loaded, params)
    with pytest.raises(FileNotFoundError, match="not in the local HF cache"):
        from_pretrained("other-t5")


def test_the_shipped_backbone_is_found_by_name():
    from compacter_jax.paths import checkpoints_dir, shipped_checkpoint

    if not (checkpoints_dir() / "t5-mini-glue" / "config.json").is_file():
        pytest.skip(f"no t5-mini-glue under {checkpoints_dir()}")
    assert shipped_checkpoint("t5-mini-glue") == checkpoints_dir() / "t5-mini-glue"
    assert shipped_checkpoint("../t5-mini-glue") is None and shipped_checkpoint("t5-base") is None
