"""Our Flax T5 vs transformers' PyTorch T5 (the independent reference) on tiny random models."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from t5_reference import apply_logits, make_hf_model, padded_batch

from compacter_jax.models import from_pretrained, greedy_generate, save_pretrained
from compacter_jax.models.t5 import relative_position_bucket

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

VARIANTS = {
    # T5 v1.0: relu, tied lm_head, output scaled by d_model**-0.5
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # T5 v1.1 as transformers 5 builds it: gated-gelu, tied but not scaled
    "v1_1_tied_unscaled": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # different decoder depth
    "v1_0_dec3": dict(feed_forward_proj="relu", num_layers=1, num_decoder_layers=3),
}


def _hf_logits(hf, ids, mask, dec, dmask):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long),
                  decoder_input_ids=torch.tensor(dec, dtype=torch.long),
                  decoder_attention_mask=torch.tensor(dmask, dtype=torch.long)).logits.numpy()


def _save_untied(hf, directory):
    """A real v1.1/FLAN-style checkpoint: tie_word_embeddings false + its own lm_head.weight."""
    hf.save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    cfg.pop("scale_decoder_outputs", None)  # as in transformers-4 files
    (directory / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = np.random.RandomState(1).randn(
        *tensors["shared.weight"].shape).astype(np.float32)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_hf(tmp_path, variant):
    hf = make_hf_model(seed=0, **VARIANTS[variant])
    hf.save_pretrained(tmp_path)
    model, params = from_pretrained(str(tmp_path))
    ids, mask, dec, dmask = padded_batch(hf.config.vocab_size)
    ours = apply_logits(model, params, ids, mask, dec, dmask)
    assert ours.dtype == jnp.float32 and ours.shape == dec.shape + (hf.config.vocab_size,)
    ref = _hf_logits(hf, ids, mask, dec, dmask)
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_untied_lm_head_matches_hf(tmp_path):
    hf = _save_untied(make_hf_model(seed=0, feed_forward_proj="gated-gelu"), tmp_path)
    model, params = from_pretrained(str(tmp_path))
    assert not model.config.tie_word_embeddings and not model.config.scale_decoder_outputs
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]),
                                  hf.lm_head.weight.detach().numpy().T)
    ids, mask, dec, dmask = padded_batch(hf.config.vocab_size, seed=1)
    ours = apply_logits(model, params, ids, mask, dec, dmask)
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, ids, mask, dec, dmask),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_greedy_generation_token_identical(tmp_path, tied):
    hf = make_hf_model(seed=1, feed_forward_proj="relu" if tied else "gated-gelu",
                       tie_word_embeddings=tied)
    with torch.no_grad():  # sharper decoder so random outputs vary and some rows stop early
        for p in hf.decoder.parameters():
            p.mul_(2.0)
        hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5.0)
    hf.save_pretrained(tmp_path)
    model, params = from_pretrained(str(tmp_path), scan_layers=not tied)
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 64, (4, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    n = 16
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          do_sample=False, num_beams=1, max_new_tokens=n).numpy()[:, 1:]
    ref = np.pad(ref, ((0, 0), (0, n - ref.shape[1])))
    # The reference must exercise varied tokens and per-row early stopping.
    assert len(np.unique(ref)) >= 6 and (ref == 1).any(axis=1).sum() >= 1
    ours = np.asarray(greedy_generate(model, params, ids, mask, n))
    assert ours.dtype == np.int32 and ours.shape == (4, n)
    np.testing.assert_array_equal(ours, ref)


def test_hf_roundtrip_is_lossless(tmp_path):
    """HF save -> our load -> our save -> HF load: all tensors bit-identical (3 formats)."""
    cases = {
        "tied_scaled": make_hf_model(seed=2),
        "tied_unscaled": make_hf_model(seed=3, feed_forward_proj="gated-gelu",
                                       tie_word_embeddings=False),
        "untied": _save_untied(make_hf_model(seed=4, feed_forward_proj="gated-gelu"),
                               tmp_path / "untied_src"),
    }
    for name, hf in cases.items():
        src, dst = tmp_path / f"{name}_hf", tmp_path / f"{name}_ours"
        # a sharded checkpoint exercises model.safetensors.index.json
        hf.save_pretrained(src, max_shard_size="20KB" if name == "tied_scaled" else "1GB")
        for scan in (False, True):
            model, params = from_pretrained(str(src), scan_layers=scan)
            save_pretrained(dst, model.config, params)
            back = transformers.T5ForConditionalGeneration.from_pretrained(dst).eval()
            assert back.config.scale_decoder_outputs == hf.config.scale_decoder_outputs
            want, got = hf.state_dict(), back.state_dict()
            assert set(want) == set(got), name
            for key in want:
                assert torch.equal(want[key], got[key]), (name, scan, key)
            assert not list(dst.glob("*.tmp"))  # atomic writes leave no temp files
    assert (tmp_path / "tied_scaled_hf" / "model.safetensors.index.json").is_file()


def test_relative_position_buckets_match_hf():
    rel = np.arange(-1500, 1500)[None, :]
    for bidirectional in (True, False):
        for buckets, max_dist in ((32, 128), (8, 20), (64, 256)):
            ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
                max_distance=max_dist).numpy()
            ours = relative_position_bucket(jnp.asarray(rel), bidirectional, buckets, max_dist)
            np.testing.assert_array_equal(np.asarray(ours), ref)
