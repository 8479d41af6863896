"""The paper's splits: sizes, disjointness, determinism by data_seed, low-resource subsampling."""

import logging

import numpy as np
import pytest

from compacter_jax.data import get_task, paper_splits, split_indices


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
