"""Metrics against scikit-learn / scipy computed here on the same (explicitly mapped) predictions,
and hand-worked cases for the invalid-prediction rules, MultiRC EM and ReCoRD F1."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from compacter_jax.data import compute_metrics, get_task
from compacter_jax.data.metrics import normalize_answer, squad_em_f1

rng = np.random.default_rng(0)


def _noisy_texts(refs, num_classes, p_wrong=0.3, p_invalid=0.1):
    """Predicted texts: mostly right, some wrong, some unparseable; plus the parsed labels."""
    texts, parsed = [], []
    for r in refs:
        u = rng.random()
        if u < p_invalid:
            texts.append(rng.choice(["", "yes", "7", "0 1"]))
            parsed.append(None)
        else:
            label = int(rng.integers(num_classes)) if u < p_invalid + p_wrong else int(r)
            texts.append(f" {label}")
            parsed.append(label)
    return texts, parsed


def test_binary_metrics_match_sklearn():
    refs = rng.integers(0, 2, size=400)
    texts, parsed = _noisy_texts(refs, 2)
    # Invalid -> the wrong class (as the original f1_score_with_invalid), for F1 and MCC.
    flipped = np.array([1 - r if p is None else p for p, r in zip(parsed, refs)])
    got = compute_metrics("mrpc", texts, refs.tolist())
    assert got["accuracy"] == pytest.approx(100 * sklearn.metrics.accuracy_score(refs, flipped))
    assert got["f1"] == pytest.approx(100 * sklearn.metrics.f1_score(refs, flipped))
    assert got["score"] == pytest.approx((got["accuracy"] + got["f1"]) / 2)
    assert got["num_invalid"] == sum(p is None for p in parsed) > 0
    cola = compute_metrics("cola", texts, refs.tolist())
    assert cola["matthews_correlation"] == pytest.approx(
        100 * sklearn.metrics.matthews_corrcoef(refs, flipped))
    assert cola["score"] == cola["matthews_correlation"]
    assert set(cola) == {"matthews_correlation", "score", "num_invalid"}


def test_f1_by_hand():
    # The invalid "x" on a negative gold becomes a false positive: TP 2, FP 2, FN 1 -> F1 4/7.
    got = compute_metrics("qqp", ["1", "1", "1", "0", "x"], [1, 1, 0, 1, 0])
    assert got["f1"] == pytest.approx(100 * 4 / 7)
    assert got["accuracy"] == pytest.approx(40.0)
    assert compute_metrics("rte", ["x", "y"], [0, 1])["accuracy"] == 0.0


def test_cb_macro_f1_and_accuracy_match_sklearn():
    refs = rng.integers(0, 3, size=300)
    texts, parsed = _noisy_texts(refs, 3)
    as_labels = np.array([-1 if p is None else p for p in parsed])
    got = compute_metrics("cb", texts, refs.tolist())
    assert got["f1_macro"] == pytest.approx(100 * sklearn.metrics.f1_score(
        refs, as_labels, labels=[0, 1, 2], average="macro"))
    assert got["accuracy"] == pytest.approx(100 * np.mean(as_labels == refs))
    assert got["score"] == pytest.approx((got["f1_macro"] + got["accuracy"]) / 2)


def test_stsb_correlations_match_scipy():
    refs = rng.uniform(0, 5, size=200)
    preds = np.round(refs + rng.normal(0, 0.7, size=200), 1)
    texts = [f"{p:.1f}" for p in preds]
    texts[:7] = ["", "high", "nan", "3.x", "inf", "..", "-"]
    used = preds.copy()
    used[:7] = -1.0  # the documented value of an unparseable STS-B prediction
    got = compute_metrics("stsb", texts, refs.tolist())
    assert got["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(refs, used)[0])
    assert got["spearmanr"] == pytest.approx(100 * scipy.stats.spearmanr(refs, used)[0])
    assert got["num_invalid"] == 7
    assert compute_metrics("stsb", ["2.0"] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])["pearson"] == 0.0


def test_multirc_f1_and_group_exact_match():
    task = get_task("multirc")
    refs = [1, 0, 1, 1, 0, 0]
    groups = [(0, 0), (0, 0), (0, 1), (0, 1), (1, 2), (1, 2)]
    texts = ["1", "0", "1", "0", "0", "bad"]  # group (0,0) right; (0,1) and (1,2) not
    got = compute_metrics(task, texts, refs, groups=groups)
    assert got["em"] == pytest.approx(100 / 3)
    flipped = [1, 0, 1, 0, 0, 1]
    assert got["f1"] == pytest.approx(100 * sklearn.metrics.f1_score(refs, flipped))
    with pytest.raises(ValueError, match="needs `groups`"):
        compute_metrics(task, texts, refs)


def test_record_squad_metrics():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    em, f1 = squad_em_f1(["the Cat", "big dog", "", "Obama"],
                         [("cat", "kitty"), ("dog",), ("x",), ("Barack Obama", "Obama")])
    assert em == pytest.approx(100 * 2 / 4)
    assert f1 == pytest.approx(100 * (1 + 2 * 0.5 * 1 / 1.5 + 0 + 1) / 4)
    got = compute_metrics("record", [" the Cat ", "big dog"], [("cat",), ("dog",)])
    assert got["em"] == 50.0 and got["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert got["score"] == pytest.approx((got["em"] + got["f1"]) / 2)


def test_input_checks():
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        compute_metrics("rte", ["0", "1"], [0, 1, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("rte", [], [])
    # already-parsed labels are accepted; out-of-range ones count as invalid
    got = compute_metrics("rte", [0, 1, 5], [0, 1, 1])
    assert got["accuracy"] == pytest.approx(200 / 3) and got["num_invalid"] == 1
