"""Cutting the vocabulary to the tokenizer's size (HF `resize_token_embeddings`): the kept
ids' logits are unchanged, HF PyTorch's resize gives the same model, growth is refused."""

from __future__ import annotations

import json

import flax.traverse_util as traverse_util
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from t5_reference import apply_logits, make_hf_model, padded_batch, random_params

from compacter_jax.models import (T5ForConditionalGeneration, from_pretrained,
                                  resize_token_embeddings)
from compacter_jax.models.config import PRESETS

EPS32 = float(np.finfo(np.float32).eps)
TINY = PRESETS["t5-tiny"].replace(vocab_size=96, num_layers=1, num_decoder_layers=1)
CONFIGS = {  # v1.0: tied + scaled; v1.1: gated-gelu, own lm_head, not scaled
    "v1_0_tied": TINY,
    "v1_1_untied": TINY.replace(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                scale_decoder_outputs=False),
}


def logit_tolerance(ref: np.ndarray, d_model: int) -> float:
    """The kept logits are the same d_model-term dot products; only the matmul's blocking may
    differ: a few eps32 per term, relative to the largest logit."""
    return 4 * d_model * EPS32 * float(np.abs(ref).max())


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_cut_keeps_the_logits_of_the_kept_ids(variant):
    config, n = CONFIGS[variant], 80
    model = T5ForConditionalGeneration(config)
    params = random_params(model)
    cut_params, cut_config = resize_token_embeddings(params, config, n)
    assert cut_config == config.replace(vocab_size=n)
    assert cut_params["shared"]["embedding"].shape == (n, config.d_model)
    np.testing.assert_array_equal(cut_params["shared"]["embedding"],
                                  params["shared"]["embedding"][:n])
    if not config.tie_word_embeddings:
        assert cut_params["lm_head"]["kernel"].shape == (config.d_model, n)
    batch = padded_batch(n)  # ids the cut model has
    full = np.asarray(apply_logits(model, params, *batch))
    cut = np.asarray(apply_logits(T5ForConditionalGeneration(cut_config), cut_params, *batch))
    assert cut.shape == full.shape[:-1] + (n,)
    np.testing.assert_allclose(cut, full[..., :n], rtol=0,
                               atol=logit_tolerance(full, config.d_model))
    # the softmax is over n entries now: the log-probabilities of the kept ids rise
    assert (jax.nn.log_softmax(cut, -1) > jax.nn.log_softmax(full, -1)[..., :n]).all()


@pytest.mark.parametrize("tied", [True, False])
def test_matches_hf_resize_token_embeddings(tmp_path, tied):
    """transformers' own resize on a tiny random T5 (vocab 64 -> 50): the logits of the HF
    resized model equal ours, from the cut checkpoint load and from the pure function."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = make_hf_model(seed=0, feed_forward_proj="relu" if tied else "gated-gelu",
                       tie_word_embeddings=tied, num_layers=1, num_decoder_layers=1)
    hf.save_pretrained(tmp_path)
    if not tied:  # a T5 v1.1 checkpoint: tie_word_embeddings false and its own lm_head.weight
        config = json.loads((tmp_path / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (tmp_path / "config.json").write_text(json.dumps(config))
        tensors = load_file(tmp_path / "model.safetensors")
        tensors["lm_head.weight"] = np.random.RandomState(1).randn(
            *tensors["shared.weight"].shape).astype(np.float32)
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
        hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
        # transformers 5 keeps tie_word_embeddings true in T5 configs and its resize would
        # re-tie lm_head to the embedding; transformers 4 (the original's) cut it separately
        hf.config.tie_word_embeddings = False
        old_head = hf.lm_head.weight.detach().numpy().copy()
    n = 50
    hf.resize_token_embeddings(n)
    assert hf.get_output_embeddings().weight.shape[0] == n
    if not tied:
        assert hf.lm_head.weight is not hf.shared.weight
        np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(), old_head[:n])
    batch = padded_batch(n, seed=2)
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in zip(
            ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask"),
            batch)}).logits.numpy()
    assert ref.shape[-1] == n and np.abs(ref).max() > 1.0
    model, params = from_pretrained(str(tmp_path), vocab_size=n)
    assert model.config.vocab_size == n and model.config.tie_word_embeddings == tied
    np.testing.assert_allclose(np.asarray(apply_logits(model, params, *batch)), ref,
                               atol=1e-4, rtol=0)  # as the other HF parity tests
    full_model, full_params = from_pretrained(str(tmp_path))
    cut_params, cut_config = resize_token_embeddings(full_params, full_model.config, n)
    for path, leaf in traverse_util.flatten_dict(cut_params).items():
        np.testing.assert_array_equal(leaf, traverse_util.flatten_dict(params)[path])
    assert cut_config == model.config


def test_random_backbone_is_cut_from_the_full_draw(monkeypatch):
    """random:<preset> with vocab_size: the backbone drawn at full size, then cut (the kept
    rows equal the uncut draw's), so a run and its exported adapter see the same weights."""
    monkeypatch.setitem(PRESETS, "t5-micro", CONFIGS["v1_1_untied"])  # cheap to draw
    full_model, full = from_pretrained("random:t5-micro")
    model, cut = from_pretrained("random:t5-micro", vocab_size=80)
    assert model.config == full_model.config.replace(vocab_size=80)
    np.testing.assert_array_equal(cut["shared"]["embedding"], full["shared"]["embedding"][:80])
    np.testing.assert_array_equal(cut["lm_head"]["kernel"], full["lm_head"]["kernel"][:, :80])
    assert jax.tree_util.tree_structure(cut) == jax.tree_util.tree_structure(full)


def test_refuses_growth_and_leaves_of_vocabulary_size():
    config = CONFIGS["v1_1_untied"]
    params = random_params(T5ForConditionalGeneration(config))
    with pytest.raises(ValueError, match="only cutting"):
        resize_token_embeddings(params, config, config.vocab_size + 1)
    with pytest.raises(ValueError, match="positive integer"):
        resize_token_embeddings(params, config, 0)
    # e.g. a PEFT bias on the logits: the function cannot know how to cut it
    with_bias = {**params, "lm_head_delta": {"bias": np.zeros(config.vocab_size, np.float32)}}
    with pytest.raises(ValueError, match="lm_head_delta/bias"):
        resize_token_embeddings(with_bias, config, 80)
    same, same_config = resize_token_embeddings(with_bias, config, config.vocab_size)  # no-op
    assert same_config == config and same["lm_head_delta"]["bias"].shape == (config.vocab_size,)
