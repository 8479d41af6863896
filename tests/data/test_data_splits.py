"""The paper's splits: sizes, disjointness, determinism by data_seed, low-resource subsampling,
and the original code's very rows (torch.randperm, its rules written out below)."""

import logging

import numpy as np
import pytest

from compacter_jax.data import get_task, paper_splits, split_indices
from compacter_jax.data.splitting import limit_eval_rows


def _ids(examples):
    return [ex["idx"] for ex in examples]


def test_small_task_halves_the_validation_set():
    plan = split_indices("rte", 2490, 277, data_seed=42)
    assert plan["train"][0] == "train" and np.array_equal(plan["train"][1], np.arange(2490))
    (vname, val), (tname, test) = plan["validation"], plan["test"]
    assert vname == tname == "validation"
    assert (len(val), len(test)) == (138, 139)
    assert sorted(np.concatenate([val, test]).tolist()) == list(range(277))
    again = split_indices("rte", 2490, 277, data_seed=42)
    assert all(np.array_equal(plan[k][1], again[k][1]) for k in plan)
    other = split_indices("rte", 2490, 277, data_seed=7)
    assert not np.array_equal(plan["validation"][1], other["validation"][1])


def test_large_task_holds_out_1000_training_examples():
    plan = split_indices("qnli", 104743, 5463, data_seed=42)
    assert [plan[k][0] for k in ("train", "validation", "test")] == ["train", "train", "validation"]
    train, val, test = (plan[k][1] for k in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (103743, 1000, 5463)
    assert not set(train.tolist()) & set(val.tolist())
    assert len(set(train.tolist()) | set(val.tolist())) == 104743
    with pytest.raises(ValueError, match="need more than 1000"):
        split_indices("sst2", 900, 100)


def test_mnli_uses_mismatched_and_matched():
    plan = split_indices("mnli", 392702, 0)
    assert plan["validation"] == ("validation_mismatched", None)
    assert plan["test"] == ("validation_matched", None)
    assert len(plan["train"][1]) == 392702


@pytest.mark.parametrize("task,num_train", [("rte", 2490), ("qnli", 104743), ("mnli", 5000)])
def test_train_samples_are_seeded_subsets(task, num_train):
    full = split_indices(task, num_train, 277, data_seed=1)
    for n in (100, 500, 1000):
        a = split_indices(task, num_train, 277, data_seed=1, train_samples=n)
        b = split_indices(task, num_train, 277, data_seed=1, train_samples=n)
        c = split_indices(task, num_train, 277, data_seed=2, train_samples=n)
        assert len(a["train"][1]) == n and len(set(a["train"][1].tolist())) == n
        assert np.array_equal(a["train"][1], b["train"][1])
        assert not np.array_equal(a["train"][1], c["train"][1])
        assert set(a["train"][1].tolist()) <= set(full["train"][1].tolist())
        # validation / test do not depend on train_samples
        assert all(np.array_equal(a[k][1], full[k][1]) if a[k][1] is not None else True
                   for k in ("validation", "test"))
    with pytest.raises(ValueError, match="must be positive"):
        split_indices(task, num_train, 277, train_samples=0)


def test_train_samples_beyond_the_data_keep_everything(caplog):
    with caplog.at_level(logging.WARNING):
        plan = split_indices("cb", 250, 56, train_samples=4000)
    assert sorted(plan["train"][1].tolist()) == list(range(250))
    assert "exceeds the 250 training examples" in caplog.text


def test_paper_splits_on_real_data(files_source):
    rte = paper_splits("rte", files_source)
    assert {k: len(v) for k, v in rte.items()} == {"train": 2490, "validation": 138, "test": 139}
    assert sorted(_ids(rte["validation"]) + _ids(rte["test"])) == list(range(277))
    cb = paper_splits("cb", files_source, train_samples=100, data_seed=3)
    assert {k: len(v) for k, v in cb.items()} == {"train": 100, "validation": 28, "test": 28}
    assert _ids(cb["train"]) == _ids(paper_splits("cb", files_source, train_samples=100,
                                                  data_seed=3)["train"])
    sst2 = paper_splits("sst2", files_source)  # large: 1,000 of train -> validation
    assert {k: len(v) for k, v in sst2.items()} == {"train": 66349, "validation": 1000,
                                                   "test": 872}
    assert not set(_ids(sst2["train"])) & set(_ids(sst2["validation"]))
    assert _ids(sst2["test"]) == list(range(872))


class _FakeSource:
    """In-memory source: each official split holds `sizes[split]` examples tagged with it."""

    name = "fake"

    def __init__(self, sizes):
        self.sizes = sizes
        self.calls = []

    def load(self, task, split):
        self.calls.append(split)
        return [{"premise": "p", "hypothesis": "h", "label": 0, "idx": i, "split": split}
                for i in range(self.sizes[split])]


def test_paper_splits_mnli_reads_both_validation_sets():
    src = _FakeSource({"train": 50, "validation_matched": 7, "validation_mismatched": 5})
    out = paper_splits(get_task("mnli"), src)
    assert {k: (len(v), v[0]["split"]) for k, v in out.items()} == {
        "train": (50, "train"), "validation": (5, "validation_mismatched"),
        "test": (7, "validation_matched")}
    assert "validation" not in src.calls


# The original (seq2seq/data/tasks.py, split_validation_test=True, data_seed 42), written out
# with real torch: every permutation is torch.randperm(len(dataset), manual_seed(data_seed)).

def _original_perm(n, seed=42):
    torch = pytest.importorskip("torch")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _original_small_eval(num_validation, split, n_obs=None, seed=42):
    """get(split != "train") of a small task: halves of the permuted official validation."""
    indices = _original_perm(num_validation, seed)
    half = num_validation // 2
    indices = indices[:half] if split == "validation" else indices[half:]
    return indices if n_obs is None else indices[:n_obs]


def _original_train(task_is_large, num_train, n_obs=None, seed=42):
    """get("train", n_obs): large tasks cut perm[1000:]; others subsample a fresh permutation."""
    if task_is_large:
        indices = _original_perm(num_train, seed)[1000:]
        return indices if n_obs is None else indices[:n_obs]
    return list(range(num_train)) if n_obs is None else _original_perm(num_train, seed)[:n_obs]


@pytest.mark.parametrize("task", ["rte", "mrpc", "cola", "stsb"])
def test_small_task_halves_are_the_originals_rows(files_source, task):
    official = files_source.load(task, "validation")
    out = paper_splits(task, files_source)
    for split in ("validation", "test"):
        expected = _original_small_eval(len(official), split)
        assert out[split] == [official[i] for i in expected], split
        assert _ids(out[split]) == expected  # GLUE idx = row number in the file
    assert out["train"] == files_source.load(task, "train")


def test_low_resource_subsamples_are_the_originals_rows(files_source):
    rte_train = files_source.load("rte", "train")
    rte = paper_splits("rte", files_source, train_samples=100)
    assert _ids(rte["train"]) == _original_train(False, len(rte_train), 100)
    assert rte["train"] == [rte_train[i] for i in _original_train(False, len(rte_train), 100)]
    sst2_train = files_source.load("sst2", "train")
    sst2 = paper_splits("sst2", files_source, train_samples=100)
    assert _ids(sst2["train"]) == _original_train(True, len(sst2_train), 100)
    assert _ids(sst2["validation"]) == _original_perm(len(sst2_train))[:1000]
    assert sst2["test"] == files_source.load("sst2", "validation")


def test_data_seed_moves_the_rows_as_in_the_original():
    plan = split_indices("rte", 2490, 277, data_seed=7, train_samples=50)
    assert plan["validation"][1].tolist() == _original_small_eval(277, "validation", seed=7)
    assert plan["train"][1].tolist() == _original_train(False, 2490, 50, seed=7)
    big = split_indices("qnli", 104743, 5463, data_seed=3, train_samples=200)
    assert big["train"][1].tolist() == _original_train(True, 104743, 200, seed=3)


def test_eval_limits_follow_the_original_n_obs():
    plan = split_indices("mrpc", 3668, 408)
    val = limit_eval_rows("mrpc", "validation", plan["validation"][1], 408, 50)
    test = limit_eval_rows("mrpc", "test", plan["test"][1], 408, 50)
    assert val.tolist() == _original_small_eval(408, "validation", n_obs=50)
    assert test.tolist() == _original_small_eval(408, "test", n_obs=50)
    big = split_indices("qnli", 104743, 5463)
    val = limit_eval_rows("qnli", "validation", big["validation"][1], 104743, 64)
    assert val.tolist() == _original_perm(104743)[:64]
    # Whole official splits (large tasks' test, MNLI's both) get a fresh permutation.
    test = limit_eval_rows("qnli", "test", big["test"][1], 5463, 64)
    assert test.tolist() == _original_perm(5463)[:64]
    assert limit_eval_rows("mnli", "test", None, 9815, 10).tolist() == _original_perm(9815)[:10]
    assert limit_eval_rows("mnli", "validation", None, 9832, None) is None
    with pytest.raises(ValueError, match="max_test_samples must be positive"):
        limit_eval_rows("rte", "test", plan["test"][1], 408, 0)
    with pytest.raises(ValueError, match="split must be one of"):
        limit_eval_rows("rte", "train", plan["train"][1], 3668, 5)


def test_paper_splits_applies_eval_limits(files_source, caplog):
    full = paper_splits("rte", files_source)
    cut = paper_splits("rte", files_source, max_validation_samples=20, max_test_samples=30)
    assert cut["validation"] == full["validation"][:20] and cut["test"] == full["test"][:30]
    assert cut["train"] == full["train"]
    with caplog.at_level(logging.WARNING):
        more = paper_splits("rte", files_source, max_test_samples=1000)
    assert more["test"] == full["test"] and "exceeds the 277 examples" in caplog.text
    src = _FakeSource({"train": 50, "validation_matched": 7, "validation_mismatched": 5})
    mnli = paper_splits("mnli", src, max_validation_samples=3)
    assert [ex["idx"] for ex in mnli["validation"]] == _original_perm(5)[:3]
    assert len(mnli["test"]) == 7
