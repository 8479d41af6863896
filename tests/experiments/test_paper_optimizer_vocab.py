"""The paper recipe's optimizer and vocabulary: transformers' AdamW ("hf_adamw") and the
embedding cut to the tokenizer (32,128 -> 32,100), in the config, its validation and a run."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from tiny_runs import fast_compiles, tiny_config

from compacter_jax import peft
from compacter_jax.models import greedy_generate
from compacter_jax.models.config import PRESETS
from compacter_jax.serve import Predictor
from experiments import backbone, finetune
from experiments.configs import glue, paper
from experiments.spec import ConfigError, validate_config


def test_paper_recipe_uses_the_originals_optimizer_and_vocabulary():
    for c in (glue.get_config("paper"), paper.get_config("rte,bitfit")):
        assert (c.optimizer, c.resize_vocab_to_tokenizer) == ("hf_adamw", True)
    quick = glue.get_config()
    assert (quick.optimizer, quick.resize_vocab_to_tokenizer) == ("adamw", False)


def test_bad_values_are_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"--config.optimizer='adam'.*hf_adamw"):
        validate_config(tiny_config(optimizer="adam"))
    c = tiny_config()
    c.resize_vocab_to_tokenizer = True
    validate_config(c)
    with pytest.raises(ConfigError, match="resize_vocab_to_tokenizer='yes'.*True or False"):
        validate_config({**c.to_dict(), "resize_vocab_to_tokenizer": "yes"})  # e.g. from JSON


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=32_100))
    backbone.check_tokenizer_fits(range(32_100), model)
    with pytest.raises(ValueError, match="32101 entries but the model's vocabulary only 32100"):
        backbone.check_tokenizer_fits(range(32_101), model)
    assert backbone.tokenizer_vocab_size(tiny_config(), range(7)) is None
    assert backbone.tokenizer_vocab_size(tiny_config(resize_vocab_to_tokenizer=True),
                                         range(7)) == 7


def test_load_model_cuts_the_vocabulary_before_the_method(monkeypatch):
    """What a run does with resize_vocab_to_tokenizer: the backbone is cut, then BitFit's
    lm_head bias is made at the cut size (fast version of the run below)."""
    monkeypatch.setitem(PRESETS, "t5-micro", PRESETS["t5-tiny"].replace(
        vocab_size=96, num_layers=1, num_decoder_layers=1))
    config = tiny_config(model="random:t5-micro", method="bitfit")
    config.peft.reduction_factor = None  # tiny_config's is for adapters
    method = peft.get_method("bitfit")
    model, params, _ = backbone.load_model(config, method, jax.random.PRNGKey(0), vocab_size=80)
    assert model.config.vocab_size == 80 and params["shared"]["embedding"].shape == (80, 64)
    bias = [v for k, v in jax.tree_util.tree_flatten_with_path(method.partition(params)[0])[0]
            if "lm_head" in jax.tree_util.keystr(k)]
    assert [b.shape for b in bias] == [(80,)]
    backbone.check_tokenizer_fits(range(80), model)
    with pytest.raises(ValueError, match="81 entries"):
        backbone.check_tokenizer_fits(range(81), model)


@pytest.mark.long
def test_bitfit_run_on_the_tokenizer_vocabulary(shared_data, tmp_path):
    """BitFit with the paper's optimizer on the cut vocabulary: its lm_head bias has the
    tokenizer's 32,100 entries; generation and rank classification score (no invalid output
    from an id the tokenizer lacks); the export reloads onto the same cut backbone."""
    config = tiny_config(method="bitfit", optimizer="hf_adamw", resize_vocab_to_tokenizer=True,
                         eval_mode="both", max_steps=2, eval_every=2, save_every=2,
                         learning_rate=3e-4)
    config.peft.reduction_factor = None  # tiny_config's is for adapters
    with fast_compiles():
        summary = finetune.train_and_evaluate(config, tmp_path)
        trained, meta = peft.load_trainable(tmp_path / "adapter")
        assert meta["vocab_size"] == 32_100
        bias = [v for k, v in jax.tree_util.tree_flatten_with_path(trained)[0]
                if "lm_head" in jax.tree_util.keystr(k)]
        assert [b.shape for b in bias] == [(32_100,)]
        assert summary["validation"]["validation/accuracy"] >= 0
        model, params = peft.load_adapter(tmp_path / "adapter")
        assert model.config.vocab_size == 32_100
        ids = np.full((2, 5), 100, np.int32)
        out = np.asarray(greedy_generate(model, params, ids, np.ones_like(ids),
                                         max_new_tokens=3))
        # serving puts the adapter on the same cut backbone
        predictor = Predictor(None, {"rte": tmp_path / "adapter"}, batch_size=2)
        assert predictor.model.config.vocab_size == 32_100
        served = predictor.predict([{"task": "rte", "sentence1": "A dog.",
                                     "sentence2": "An animal."}])
    assert out.max() < 32_100
    assert isinstance(served[0]["prediction"], str)
