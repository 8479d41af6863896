"""Metrics as the original Compacter code scores them (`seq2seq/metrics/metrics.py`).

References are computed here the original's way: sklearn / scipy on the *decoded strings*
(invalid predictions flipped where the original flips them, kept as their own strings where it
does not), plus hand-worked cases for MultiRC EM and ReCoRD."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from compacter_jax.data import compute_metrics, get_task
from compacter_jax.data.metrics import normalize_answer, squad_em_f1

rng = np.random.default_rng(0)
JUNK = ["", "yes", "7", "0 1", "01", "1.0"]


def _noisy_texts(refs, num_classes, p_wrong=0.3, p_invalid=0.15):
    """Predicted texts: mostly right, some wrong, some invalid (several distinct junk texts)."""
    texts = []
    for r in refs:
        u = rng.random()
        if u < p_invalid:
            texts.append(str(rng.choice(JUNK)))
        else:
            label = int(rng.integers(num_classes)) if u < p_invalid + p_wrong else int(r)
            texts.append(f" {label}")
    return texts


def _original_f1_with_invalid(texts, refs):
    """The original `f1_score_with_invalid` on strings."""
    targets = np.asarray([str(r) for r in refs])
    preds = np.asarray([t.strip() for t in texts], dtype=object)
    invalid = (preds != "0") & (preds != "1")
    preds[invalid] = ["0" if t == "1" else "1" for t in targets[invalid]]
    return 100 * sklearn.metrics.f1_score(targets.astype(np.int32), preds.astype(np.int32))


def test_binary_metrics_match_the_original_string_computation():
    refs = rng.integers(0, 2, size=400)
    texts = _noisy_texts(refs, 2)
    stripped = [t.strip() for t in texts]
    gold = [str(r) for r in refs]
    got = compute_metrics("mrpc", texts, refs.tolist())
    assert got["accuracy"] == pytest.approx(100 * np.mean(np.array(stripped) == np.array(gold)))
    assert got["f1"] == pytest.approx(_original_f1_with_invalid(texts, refs))
    assert got["score"] == pytest.approx((got["accuracy"] + got["f1"]) / 2)
    assert got["num_invalid"] == sum(s not in ("0", "1") for s in stripped) > 0
    assert list(got) == ["accuracy", "f1", "score", "num_invalid"]


def test_cola_mcc_keeps_invalid_strings_as_classes():
    refs = rng.integers(0, 2, size=400)
    texts = _noisy_texts(refs, 2)
    stripped = [t.strip() for t in texts]
    # The original: sklearn MCC on the raw strings, no flipping.
    want = 100 * sklearn.metrics.matthews_corrcoef([str(r) for r in refs], stripped)
    cola = compute_metrics("cola", texts, refs.tolist())
    assert cola["matthews_correlation"] == pytest.approx(want)
    assert cola["score"] == cola["matthews_correlation"]
    assert set(cola) == {"matthews_correlation", "score", "num_invalid"}
    # Two different junk strings are two classes: 0.408 here, not 0.447 (one merged class).
    two = compute_metrics("cola", ["0", "1", "foo", "bar"], [0, 1, 1, 0])
    assert two["matthews_correlation"] == pytest.approx(100 / np.sqrt(6))
    merged = compute_metrics("cola", ["0", "1", "foo", "foo"], [0, 1, 1, 0])
    assert merged["matthews_correlation"] == pytest.approx(100 / np.sqrt(5))
    # Flipping invalid predictions (as for F1) is not what the original does for MCC.
    flipped = 100 * sklearn.metrics.matthews_corrcoef([0, 1, 1, 0], [0, 1, 0, 1])
    assert two["matthews_correlation"] != pytest.approx(flipped)


def test_f1_by_hand():
    # The invalid "x" on a negative gold becomes a false positive: TP 2, FP 2, FN 1 -> F1 4/7.
    got = compute_metrics("qqp", ["1", "1", "1", "0", "x"], [1, 1, 0, 1, 0])
    assert got["f1"] == pytest.approx(100 * 4 / 7)
    assert got["accuracy"] == pytest.approx(40.0)
    assert compute_metrics("rte", ["x", "y"], [0, 1])["accuracy"] == 0.0
    # "01" is not the string "1": wrong, as in the original.
    assert compute_metrics("rte", ["01", "1"], [1, 1])["accuracy"] == 50.0


def test_cb_multiclass_f1_and_accuracy():
    refs = rng.integers(0, 3, size=300)
    texts = _noisy_texts(refs, 3)
    stripped = np.array([t.strip() for t in texts])
    gold = np.array([str(r) for r in refs])
    # The original: fbeta_score(beta=1, labels=range(3), average="macro") on strings; the
    # string labels "0".."2" are the classes (an invalid string is in none of them).
    want_f1 = 100 * sklearn.metrics.fbeta_score(gold, stripped, beta=1,
                                                labels=["0", "1", "2"], average="macro")
    got = compute_metrics("cb", texts, refs.tolist())
    assert got["f1_multiclass"] == pytest.approx(want_f1)
    assert got["accuracy"] == pytest.approx(100 * np.mean(stripped == gold))
    assert got["score"] == pytest.approx((got["f1_multiclass"] + got["accuracy"]) / 2)


def _string_to_float(text, default=-1.0):
    try:
        return float(text)
    except ValueError:
        return default


def test_stsb_correlations_as_the_original():
    refs = np.round(rng.uniform(0, 5, size=200), 1)  # task.reference: rounded targets
    preds = np.round(refs + rng.normal(0, 0.7, size=200), 1)
    texts = [f"{p:.1f}" for p in preds]
    texts[:5] = ["", "high", "3.x", "..", "-"]
    used = np.array([_string_to_float(t) for t in texts])
    got = compute_metrics("stsb", texts, refs.tolist())
    assert got["pearson"] == pytest.approx(100 * scipy.stats.pearsonr(refs, used)[0])
    assert got["spearmanr"] == pytest.approx(100 * scipy.stats.spearmanr(refs, used)[0])
    assert got["num_invalid"] == 5
    # A genuine "-1.0" parses (it is not counted invalid, though it scores like one).
    assert compute_metrics("stsb", ["-1.0", "2.0"], [1.0, 2.0])["num_invalid"] == 0
    # "inf" parses: Pearson is NaN -> 0; Spearman ranks it highest (as scipy on the original).
    texts[5] = "inf"
    got = compute_metrics("stsb", texts, refs.tolist())
    used[5] = np.inf
    assert got["pearson"] == 0.0 and got["num_invalid"] == 6
    assert got["spearmanr"] == pytest.approx(100 * scipy.stats.spearmanr(refs, used)[0])
    assert got["spearmanr"] != 0.0
    texts[6] = "nan"  # NaN propagates into both: 0, 0
    got = compute_metrics("stsb", texts, refs.tolist())
    assert got["pearson"] == got["spearmanr"] == got["score"] == 0.0
    assert compute_metrics("stsb", ["2.0"] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])["pearson"] == 0.0


def test_multirc_f1_and_group_exact_match():
    task = get_task("multirc")
    refs = [1, 0, 1, 1, 0, 0]
    groups = [7, 7, 8, 8, 9, 9]  # question indices
    texts = ["1", "0", "1", "0", "0", "bad"]  # question 7 right; 8 and 9 not
    got = compute_metrics(task, texts, refs, groups=groups)
    assert got["em"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(_original_f1_with_invalid(texts, refs))
    with pytest.raises(ValueError, match="needs `groups`"):
        compute_metrics(task, texts, refs)


def test_record_squad_metrics_weighted_by_answers():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    em, f1 = squad_em_f1(["the Cat", "big dog", "", "Obama"],
                         [("cat", "kitty"), ("dog",), ("x",), ("Barack Obama", "Obama")])
    assert em == pytest.approx(100 * 2 / 4)
    assert f1 == pytest.approx(100 * (1 + 2 * 0.5 * 1 / 1.5 + 0 + 1) / 4)
    # T5's token F1 is 0 without a common token, even for two empty strings ("The" -> "").
    assert squad_em_f1(["a"], [("The",)]) == (100.0, 0.0)
    # The original scores one duplicated row per gold answer: query 1 (2 answers) counts twice.
    refs = [("cat", "kitty"), ("dog",)]
    got = compute_metrics("record", [" the Cat ", "big dog"], refs)
    assert got["em"] == pytest.approx(100 * (1 + 1 + 0) / 3)
    assert got["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3) / 3)
    assert got["score"] == pytest.approx((got["em"] + got["f1"]) / 2)
    once = compute_metrics("record", [" the Cat ", "big dog"], refs,
                           weight_record_by_answers=False)
    assert once["em"] == 50.0 and once["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    # Same as scoring the duplicated rows one by one.
    rows = [(" the Cat ", refs[0])] * 2 + [("big dog", refs[1])]
    dup = compute_metrics("record", [p for p, _ in rows], [r for _, r in rows],
                          weight_record_by_answers=False)
    assert dup["em"] == pytest.approx(got["em"]) and dup["f1"] == pytest.approx(got["f1"])


def test_input_checks():
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        compute_metrics("rte", ["0", "1"], [0, 1, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("rte", [], [])
    with pytest.raises(ValueError, match=r"references must be class indices 0\.\.1.*\[-1\]"):
        compute_metrics("rte", ["0", "1"], [0, -1])
    with pytest.raises(ValueError, match="references must be finite scores"):
        compute_metrics("stsb", ["0", "1"], [1.0, float("nan")])
    # already-parsed labels are accepted; out-of-range ones count as invalid (one class)
    got = compute_metrics("rte", [0, 1, 5], [0, 1, 1])
    assert got["accuracy"] == pytest.approx(200 / 3) and got["num_invalid"] == 1
    parsed = compute_metrics("cola", [0, 1, -1, -1], [0, 1, 1, 0])
    assert parsed["matthews_correlation"] == pytest.approx(100 / np.sqrt(5))
    assert list(compute_metrics("cb", ["0"], [0])) == ["f1_multiclass", "accuracy", "score",
                                                        "num_invalid"]


def test_jsonable_is_strict_json():
    """What prediction files and served answers write: valid JSON (no NaN), tuples as lists."""
    import json

    import numpy as np

    from compacter_jax.data.metrics import jsonable

    value = {"a": (1, np.int64(2), (np.float32(0.5), float("nan"))), "b": np.float64("inf"),
             "c": [float("-inf"), "x", None, True]}
    out = jsonable(value)
    assert out == {"a": [1, 2, [0.5, "nan"]], "b": "inf", "c": ["-inf", "x", None, True]}
    assert type(out["a"][1]) is int and json.loads(json.dumps(out, allow_nan=False)) == out
    assert jsonable(3.5) == 3.5 and jsonable("entailment") == "entailment"
