"""experiments/probe.py: the pooled features against numpy on a tiny random T5, their padding
invariance, and the CLI on a tiny SST-2-shaped data dir whose labels the probe must learn."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compacter_jax.data import split_indices
from compacter_jax.models.hf_io import from_pretrained, save_pretrained
from experiments import probe

EPS = float(np.finfo(np.float32).eps)
LENGTHS = (7, 3, 1, 5)  # real tokens per row of a [4, 9] batch: padded rows of every kind


@pytest.fixture(scope="module")
def tiny():
    """(model, params) of random:t5-tiny (d_model 64, 2 + 2 layers), a padded batch, mask."""
    model, params = from_pretrained("random:t5-tiny")
    rng = np.random.default_rng(0)
    ids = np.zeros((len(LENGTHS), 9), np.int32)
    for i, n in enumerate(LENGTHS):
        ids[i, :n - 1] = rng.integers(3, 2000, n - 1)
        ids[i, n - 1] = 1  # EOS
    return model, params, ids, (ids != 0).astype(np.int32)


@pytest.fixture(scope="module")
def features(tiny):
    """probe.all_features of the batch (each feature function, one compiled program)."""
    model, params, ids, mask = tiny
    return jax.device_get(probe.all_features(model, params, ids, mask))


def test_pooled_features_are_the_mean_over_real_tokens(tiny, features):
    model, params, ids, mask = tiny
    table = np.asarray(params["shared"]["embedding"])
    hidden = np.asarray(jax.jit(functools.partial(model.apply, method=model.encode))(
        {"params": params}, ids, mask))
    for name, x in (("embedding_mean", table[ids]), ("encoder_mean", hidden)):
        got = features[name]
        assert got.shape == (4, 64) and got.dtype == np.float32
        want = np.stack([x[i, :n].astype(np.float64).mean(axis=0)
                         for i, n in enumerate(LENGTHS)])
        # float32 sums of <= 9 terms, then one division: a few ulps of the largest value.
        np.testing.assert_allclose(got, want, rtol=0, err_msg=name,
                                   atol=4 * EPS * np.sqrt(9) * np.abs(x).max())


def test_decoder_first_is_the_state_the_first_logits_are_read_from(tiny, features):
    model, params, ids, mask = tiny

    @jax.jit
    def first_logits(params):
        hidden = model.apply({"params": params}, ids, mask, method=model.encode)
        start = jnp.zeros((len(ids), 1), jnp.int32)  # the preset's decoder_start_token_id
        return model.apply({"params": params}, start, hidden, mask, method=model.decode)[:, 0]

    state = features["decoder_first"].astype(np.float64)
    table = np.asarray(params["shared"]["embedding"], np.float64)
    d = state.shape[1]
    want = (state * d ** -0.5) @ table.T  # the tied lm_head after T5 v1.0's scale
    # a float32 dot product of d terms: ~eps * sqrt(d) * |state| * |row| (Cauchy-Schwarz).
    bound = (np.linalg.norm(state, axis=1).max() * d ** -0.5
             * np.linalg.norm(table, axis=1).max())
    np.testing.assert_allclose(np.asarray(first_logits(params)), want, rtol=0,
                               atol=8 * EPS * np.sqrt(d) * bound)
    assert np.abs(state[0] - state[1]).max() > 1e-3  # it reads the encoder: rows differ


def test_features_do_not_change_with_extra_padding(tiny, features):
    model, params, ids, mask = tiny
    wide = jax.device_get(probe.all_features(model, params, *(np.pad(a, ((0, 0), (0, 5)))
                                                             for a in (ids, mask))))
    for name, narrow_x in features.items():
        # Masked keys get exactly zero attention; only the order of float32 sums may change,
        # through 2 + 2 layers of softmax / layer-norm sums over <= 14 positions or 64 features.
        atol = 4 * 4 * EPS * np.sqrt(64) * np.abs(narrow_x).max()
        np.testing.assert_allclose(wide[name], narrow_x, rtol=0, atol=atol, err_msg=name)


FILLER = "the a film movie plot story actor scene music ending very quite long short".split()


def _sentences(rng, n):
    """(sentence, label): label 1 iff the sentence holds "good" (else it holds "bad")."""
    rows = []
    for _ in range(n):
        label = int(rng.random() < 0.4)
        words = list(rng.choice(FILLER, rng.integers(2, 6)))
        words.insert(int(rng.integers(0, len(words) + 1)), "good" if label else "bad")
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture
def fake_glue(tmp_path):
    """An SST-2-shaped data dir: glue/SST-2/{train,dev}.tsv; returns (root, train rows)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    train = _sentences(rng, 1200)
    for name, rows in (("train.tsv", train), ("dev.tsv", _sentences(rng, 20))):
        (folder / name).write_text("sentence\tlabel\n"
                                   + "".join(f"{s} \t{y}\n" for s, y in rows))
    return tmp_path / "data", train


def test_cli_probe_learns_a_word_rule_above_the_majority_class(tiny, fake_glue, t5_vocab,
                                                               tmp_path, capsys):
    model, params = tiny[:2]
    backbone = save_pretrained(tmp_path / "backbone", model.config, params)  # a local HF dir
    root, train = fake_glue
    out = tmp_path / "results" / "probe.json"
    assert probe.main(["--model", str(backbone), "--tokenizer", str(t5_vocab), "--task",
                       "sst2", "--train-samples", "150", "--max-length", "16",
                       "--batch-size", "128", "--data-dir", str(root), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) >= {"model", "task", "train_rows", "validation_rows", "majority",
                           "accuracy", "c", "seed"}
    assert set(result["accuracy"]) == set(probe.FEATURES)
    assert (result["task"], result["train_rows"], result["validation_rows"]) == ("sst2", 150,
                                                                                 1000)
    # SST-2's paper validation split: 1,000 rows held out of train.tsv (the paper's rule).
    official, rows = split_indices("sst2", len(train), 20)["validation"]
    labels = np.array([train[i][1] for i in rows])
    assert official == "train"
    assert result["majority"] == pytest.approx(max(labels.mean(), 1 - labels.mean()))
    assert 0.55 < result["majority"] < 0.7
    # The label is one word's presence: a bag of random embeddings separates it.
    assert result["accuracy"]["embedding_mean"] > result["majority"] + 0.2
    printed = capsys.readouterr().out
    assert all(name in printed for name in probe.FEATURES) and "majority class" in printed


def test_regression_task_and_missing_model_exit_2_naming_the_flag(tmp_path, capsys):
    assert probe.main(["--model", "random:t5-tiny", "--task", "stsb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --task stsb") and "regression" in err
    missing = tmp_path / "no_such_model"
    assert probe.main(["--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {missing}") and err.count("\n") == 1
    assert probe.main(["--model", "random:t5-tiny", "--c", "0"]) == 2
    assert "--c 0.0 must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's type check
        probe.main(["--model", "random:t5-tiny", "--train-samples", "0"])
    assert exit_.value.code == 2
    assert "argument --train-samples: '0' is not a positive integer" in capsys.readouterr().err
