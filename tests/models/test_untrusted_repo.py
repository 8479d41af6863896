"""A downloaded model folder is untrusted input: config.json sizes are bounded before anything is
traced or allocated, every file an index names stays inside the folder, pickles are refused."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from compacter_jax.models import T5Config, from_pretrained, save_pretrained
from compacter_jax.models.config import MAX_SIZES, backbone_param_count
from compacter_jax.models.hf_io import load_config, param_shapes
from compacter_jax.models.t5 import T5ForConditionalGeneration

TINY = dict(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
            num_heads=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A valid tiny checkpoint folder (config.json + model.safetensors), made once."""
    config = T5Config(**TINY)
    rng = np.random.default_rng(0)
    shapes = param_shapes(T5ForConditionalGeneration(config))
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                    shapes)
    return save_pretrained(tmp_path_factory.mktemp("saved") / "model", config, params)


@pytest.fixture
def folder(saved, tmp_path):
    """A fresh copy of `saved` each test may change."""
    return Path(shutil.copytree(saved, tmp_path / "model"))


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("field,value", [
    ("num_layers", 10**6), ("num_decoder_layers", 10**6), ("vocab_size", 10**12),
    ("d_model", 10**9), ("d_ff", 10**9), ("num_heads", 10**6),
    ("relative_attention_num_buckets", 10**9)])
def test_hostile_sizes_fail_fast_naming_the_file_and_field(folder, field, value):
    _edit_config(folder, **{field: value})
    start = time.perf_counter()
    for load in (from_pretrained, load_config):
        with pytest.raises(ValueError, match=rf"{folder / 'config.json'}.*{field!r} is "
                                             rf"{value:,}, above the limit") as e:
            load(str(folder))
        assert "\n" not in str(e.value)
    assert time.perf_counter() - start < 5  # before anything is traced (was > 300 s)


def test_sizes_within_bounds_but_far_beyond_the_weights_fail_before_tracing(folder):
    _edit_config(folder, num_layers=200, num_decoder_layers=200, d_model=4096, d_ff=16384)
    with pytest.raises(ValueError, match=r"describes [\d,]+ weights .* but the weight files "
                                         r"hold [\d,]+"):
        from_pretrained(str(folder))
    _edit_config(folder, num_layers=256, num_decoder_layers=256, d_model=32768, d_ff=262144,
                 num_heads=1024, d_kv=8192)
    with pytest.raises(ValueError, match=r"describes [\d,]+ parameters .*more than"):
        load_config(str(folder))


def test_public_t5_sizes_are_within_the_bounds():
    t5_11b = dict(vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_layers=24,
                  num_decoder_layers=24, num_heads=128, feed_forward_proj="relu",
                  tie_word_embeddings=True)
    mt5_xxl = dict(vocab_size=250112, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                   num_decoder_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)
    for sizes in (t5_11b, mt5_xxl):
        assert T5Config.from_hf_dict(sizes).d_model == sizes["d_model"]
    assert all(T5Config.from_hf_dict(t5_11b).__getattribute__(k) <= v
               for k, v in MAX_SIZES.items())
    # The count is the number of weights a checkpoint stores (t5-11b: 11.3B).
    assert 11.2e9 < backbone_param_count(T5Config.from_hf_dict(t5_11b)) < 11.4e9


def test_backbone_param_count_is_what_a_checkpoint_stores(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="numpy") as f:
        stored = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert backbone_param_count(load_config(str(folder))) == stored


def _shard(folder, names: dict[str, str]):
    """Replace model.safetensors by an index naming `names` {weight: file}."""
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))


@pytest.mark.parametrize("name", ["../other/model.safetensors", "/etc/passwd.safetensors",
                                  "a/../../x.safetensors", "C:\\x.safetensors"])
def test_an_index_cannot_name_files_outside_the_folder(folder, tmp_path, name):
    outside = tmp_path / "other"
    outside.mkdir()
    save_file({"shared.weight": np.zeros((64, 8), np.float32)},
              str(outside / "model.safetensors"))
    _shard(folder, {"shared.weight": name})
    with pytest.raises(ValueError, match=r"names .*: the files of a model must be plain "
                                         r"relative paths inside its folder"):
        from_pretrained(str(folder))


def test_a_symlink_leading_out_of_the_folder_is_refused(folder, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"leads to .*elsewhere.safetensors, outside the "
                                         r"model folder"):
        from_pretrained(str(folder))
    os.symlink(outside, folder / "shard-1.safetensors")
    _shard(folder, {"shared.weight": "shard-1.safetensors"})
    with pytest.raises(ValueError, match="outside the model folder"):
        load_config(str(folder), check_weights=True)


def test_a_symlink_inside_the_folder_and_hf_cache_blobs_are_fine(folder, tmp_path):
    # The HF cache layout: snapshots/<commit>/<file> -> ../../blobs/<hash>.
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.replace(folder / name, repo / "blobs" / name)
        os.symlink(f"../../blobs/{name}", snapshot / name)
    model, params = from_pretrained(str(snapshot))
    assert model.config.d_model == 8


def test_pickled_shards_are_refused(folder):
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    _shard(folder, {"shared.weight": "pytorch_model.bin"})
    with pytest.raises(ValueError, match=r"only .safetensors files are read \(PyTorch pickles "
                                         r"are refused"):
        from_pretrained(str(folder))
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="PyTorch .bin checkpoints are not supported"):
        from_pretrained(str(folder))
