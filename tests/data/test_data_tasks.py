"""Task registry, text-to-text formatting and prediction parsing.

Formatting is checked on real rows: the expected (source, target) is rebuilt here straight
from the raw file columns, independently of the loader.
"""

import json

import pytest

from compacter_jax.data import INVALID_LABEL, INVALID_SCORE, TASKS, get_task
from compacter_jax.data.tasks import GLUE_TASKS, SUPERGLUE_TASKS

EXPECTED_LABELS = {  # spec §6 / TFDS order
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "stsb": (), "mnli": ("entailment", "neutral", "contradiction"),
    "qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"),
    "wnli": ("not_entailment", "entailment"), "boolq": ("False", "True"),
    "cb": ("entailment", "contradiction", "neutral"), "copa": ("choice1", "choice2"),
    "multirc": ("False", "True"), "record": (), "superglue_rte": ("entailment", "not_entailment"),
    "wic": ("False", "True"), "wsc.fixed": ("False", "True"),
}


def test_registry_names_labels_and_metrics():
    assert set(TASKS) == set(EXPECTED_LABELS)
    assert len(GLUE_TASKS) == 9 and len(SUPERGLUE_TASKS) == 8
    for name, labels in EXPECTED_LABELS.items():
        assert TASKS[name].label_names == labels, name
    assert get_task("superglue_rte").tfds_name == "super_glue/rte"
    assert get_task("wsc.fixed").tfds_name == "super_glue/wsc.fixed"
    assert get_task("mnli").validation_split == "validation_mismatched"
    assert get_task("mnli").test_split == "validation_matched"
    assert {n for n, t in TASKS.items() if not t.is_small} == {"sst2", "qqp", "qnli", "record",
                                                              "mnli"}
    assert TASKS["cola"].metric_names == ("matthews_correlation",)
    assert set(TASKS["mrpc"].metric_names) == {"accuracy", "f1"}
    assert set(TASKS["cb"].metric_names) == {"f1_macro", "accuracy"}
    assert set(TASKS["stsb"].metric_names) == {"pearson", "spearmanr"}
    assert set(TASKS["multirc"].metric_names) == set(TASKS["record"].metric_names) == {"f1", "em"}


def test_aliases_and_unknown_task():
    assert get_task("superglue-rte").name == "superglue_rte"
    assert get_task("super_glue/cb").name == "cb"
    assert get_task("glue/rte").name == "rte"
    assert get_task(" RTE ").name == "rte"
    with pytest.raises(ValueError, match=r"unknown task 'mnli-mm'.*valid names:.*rte.*wsc\.fixed"):
        get_task("mnli-mm")


def _tsv(path, header: bool):
    lines = open(path, encoding="utf-8").read().split("\n")
    if lines[-1] == "":
        lines.pop()
    rows = [line.split("\t") for line in lines]
    if rows and rows[0][0].startswith("\ufeff"):
        rows[0][0] = rows[0][0][1:]
    return rows[1:] if header else rows


def _rte_label(word):
    return {"entailment": "0", "not_entailment": "1"}[word]


# (task, split, relative file, header?, expected (source, target) from the raw columns)
GLUE_CASES = [
    ("cola", "train", "CoLA/train.tsv", False, lambda c: (f"sentence: {c[3]}", c[1])),
    ("cola", "validation", "CoLA/dev.tsv", False, lambda c: (f"sentence: {c[3]}", c[1])),
    ("sst2", "train", "SST-2/train.tsv", True, lambda c: (f"sentence: {c[0]}", c[1])),
    ("sst2", "validation", "SST-2/dev.tsv", True, lambda c: (f"sentence: {c[0]}", c[1])),
    ("mrpc", "train", "MRPC/train.tsv", True,
     lambda c: (f"sentence1: {c[3]} sentence2: {c[4]}", c[0])),
    ("mrpc", "validation", "MRPC/dev.tsv", True,
     lambda c: (f"sentence1: {c[3]} sentence2: {c[4]}", c[0])),
    ("stsb", "train", "STS-B/train.tsv", True,
     lambda c: (f"sentence1: {c[7]} sentence2: {c[8]}", c[9])),
    ("stsb", "validation", "STS-B/dev.tsv", True,
     lambda c: (f"sentence1: {c[7]} sentence2: {c[8]}", c[9])),
    ("rte", "train", "RTE/train.tsv", True,
     lambda c: (f"sentence1: {c[1]} sentence2: {c[2]}", _rte_label(c[3]))),
    ("rte", "validation", "RTE/dev.tsv", True,
     lambda c: (f"sentence1: {c[1]} sentence2: {c[2]}", _rte_label(c[3]))),
    ("qnli", "validation", "QNLI/dev.tsv", True,
     lambda c: (f"question: {c[1]} sentence: {c[2]}", _rte_label(c[3]))),
    ("wnli", "validation", "WNLI/dev.tsv", True,
     lambda c: (f"sentence1: {c[1]} sentence2: {c[2]}", c[3])),
]


@pytest.mark.parametrize("name,split,rel,header,expect", GLUE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in GLUE_CASES])
def test_glue_formatting_on_real_rows(files_source, shared_data, name, split, rel, header,
                                      expect):
    task = get_task(name)
    raw = _tsv(shared_data / "glue" / rel, header)
    examples = files_source.load(task, split)
    assert len(examples) == len(raw)
    for cols, ex in list(zip(raw, examples))[:1500]:  # SST-2 train: a prefix is enough
        source, target = task.format(ex)
        want_source, want_target = expect(cols)
        assert source == want_source
        if name == "stsb":  # one decimal, within rounding distance of the raw score
            assert target == f"{float(target):.1f}" and abs(float(target) - float(want_target)) <= 0.05 + 1e-9
            assert task.parse_prediction(target) == pytest.approx(float(target))
        else:
            assert target == want_target
            assert task.parse_prediction(target) == ex["label"] == int(want_target)


def test_wnli_reassembled_train_formatting(files_source, shared_data):
    task = get_task("wnli")
    folder = shared_data / "glue" / "WNLI" / "train_resplit_amrnag"
    raw = {int(c[0]): c for c in _tsv(folder / "train.tsv", True) + _tsv(folder / "val.tsv", False)}
    examples = files_source.load(task, "train")
    assert [ex["idx"] for ex in examples] == list(range(635)) == sorted(raw)
    for ex in examples:
        c = raw[ex["idx"]]
        assert task.format(ex) == (f"sentence1: {c[1]} sentence2: {c[2]}", c[3])


SUPERGLUE_CASES = [
    ("cb", "CB", lambda r: (f"premise: {r['premise']} hypothesis: {r['hypothesis']}",
                            str(r["label"]))),
    ("copa", "COPA", lambda r: (f"premise: {r['premise']} choice1: {r['choice1']} "
                                f"choice2: {r['choice2']} question: {r['question']}",
                                str(r["label"]))),
    ("boolq", "BoolQ", lambda r: (f"question: {r['question']} passage: {r['passage']}",
                                  "1" if r["answer"] else "0")),
]


@pytest.mark.parametrize("name,folder,expect", SUPERGLUE_CASES, ids=[c[0] for c in SUPERGLUE_CASES])
def test_superglue_formatting_on_real_rows(files_source, shared_data, name, folder, expect):
    task = get_task(name)
    for split, fname in (("train", "train.jsonl"), ("validation", "val.jsonl")):
        path = shared_data / "superglue" / folder / fname
        if not path.is_file():
            continue  # BoolQ has no train file here
        raw = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
        examples = files_source.load(task, split)
        assert len(examples) == len(raw)
        for r, ex in zip(raw, examples):
            assert task.format(ex) == expect(r)
            assert task.parse_prediction(task.format(ex)[1]) == ex["label"]


def test_parse_prediction_never_raises():
    rte, cb, stsb, record = (get_task(n) for n in ("rte", "cb", "stsb", "record"))
    assert rte.parse_prediction(" 1 \n") == 1
    for junk in ["", "2", "-1", "entailment", "1.0", "0 1", "１", None, "\x00"]:
        assert rte.parse_prediction(junk) == INVALID_LABEL
    assert cb.parse_prediction("2") == 2 and cb.parse_prediction("3") == INVALID_LABEL
    assert stsb.parse_prediction("3.8") == pytest.approx(3.8)
    for junk in ["", "abc", "nan", "inf", "3.8.1"]:
        assert stsb.parse_prediction(junk) == INVALID_SCORE
    assert record.parse_prediction("  Barack Obama ") == "Barack Obama"


def test_stsb_targets_round_to_one_decimal():
    stsb = get_task("stsb")
    cases = {5.0: "5.0", 3.8: "3.8", 0.0: "0.0", 4.75: "4.8", 0.25: "0.2", 2.333: "2.3",
             1.96: "2.0"}
    for score, want in cases.items():
        assert stsb.format({"sentence1": "a", "sentence2": "b", "label": score})[1] == want


def test_superglue_special_formats():
    wsc = get_task("wsc.fixed")
    ex = {"text": "This is a test sentence .", "span1_text": "test", "span1_index": 3,
          "span2_text": "This", "span2_index": 0, "label": 0}
    assert wsc.format(ex) == ("text: # This # is a * test * sentence .", "0")
    ex2 = {"text": "Mark told Pete many lies about himself .", "span1_text": "Pete",
           "span1_index": 2, "span2_text": "himself", "span2_index": 6, "label": 0}
    assert wsc.format(ex2)[0] == "text: Mark told * Pete * many lies about # himself # ."

    multirc = get_task("multirc")
    ex = {"paragraph": "<b>Sent 1: </b>A cat.<br>", "question": "What?", "answer": "A cat",
          "label": 1, "idx": {"paragraph": 3, "question": 7, "answer": 1}}
    assert multirc.format(ex) == ("question: What? answer: A cat paragraph: Sent 1: A cat. ", "1")
    assert multirc.group(ex) == (3, 7) and get_task("rte").group(ex) is None

    record = get_task("record")
    ex = {"passage": "Top story.\n@highlight\nCats rule\n@highlight\nDogs drool",
          "query": "@placeholder rules.", "entities": ["Cats", "Dogs"],
          "answers": ["Cats", "cats", "Cats"], "idx": {"passage": 0, "query": 0}}
    source = "query: @placeholder rules. entities: Cats, Dogs passage: Top story. Cats rule. Dogs drool"
    assert record.format(ex) == (source, "Cats")
    assert record.format_all(ex) == [(source, "Cats"), (source, "cats")]
    assert record.reference(ex) == ("Cats", "cats")

    copa = get_task("copa")
    assert copa.format({"premise": "P", "choice1": "A", "choice2": "B", "question": "cause",
                        "label": 1}) == ("premise: P choice1: A choice2: B question: cause", "1")
    with pytest.raises(KeyError, match="lacks field 'choice2'"):
        copa.format({"premise": "P", "choice1": "A", "question": "cause", "label": 1})
    with pytest.raises(ValueError, match="out of range"):
        get_task("rte").format({"sentence1": "a", "sentence2": "b", "label": 2})
    assert get_task("rte").format({"sentence1": "a", "sentence2": "b", "label": -1})[1] == ""
