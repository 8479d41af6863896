"""Task registry, text-to-text formatting (as the original Compacter code), target lengths and
prediction parsing.

The expected strings are written here by hand from the original's `seq2seq/data/tasks.py`
(its `preprocessor`s and `seq2seq_format`), or rebuilt straight from the raw file columns,
never computed by the code under test.
"""

import json

import numpy as np
import pytest

from compacter_jax.data import INVALID_LABEL, INVALID_SCORE, TASKS, encode, get_task
from compacter_jax.data.tasks import (
    GLUE_TASKS,
    SUPERGLUE_TASKS,
    round_stsb_target,
    stsb_target,
)

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

# The original's `AbstractTask.name` per task: what `add_prefix` writes first.
ORIGINAL_NAMES = {
    "cola": "cola", "sst2": "sst2", "mrpc": "mrpc", "qqp": "qqp", "stsb": "stsb",
    "mnli": "mnli", "qnli": "qnli", "rte": "rte", "wnli": "wnli",
    "boolq": "superglue-boolq", "cb": "superglue-cb", "copa": "superglue-copa",
    "multirc": "superglue-multirc", "record": "superglue-record",
    "superglue_rte": "superglue-rte", "wic": "superglue-wic", "wsc.fixed": "superglue-wsc.fixed",
}

# The original's TASK_TO_METRICS (run_seq2seq.py); CB's key is "f1_multiclass" there.
ORIGINAL_METRICS = {
    "cola": {"matthews_correlation"}, "sst2": {"accuracy"}, "mrpc": {"accuracy", "f1"},
    "qqp": {"accuracy", "f1"}, "stsb": {"pearson", "spearmanr"}, "mnli": {"accuracy"},
    "qnli": {"accuracy"}, "rte": {"accuracy"}, "wnli": {"accuracy"}, "boolq": {"accuracy"},
    "cb": {"f1_multiclass", "accuracy"}, "copa": {"accuracy"}, "multirc": {"f1", "em"},
    "record": {"f1", "em"}, "superglue_rte": {"accuracy"}, "wic": {"accuracy"},
    "wsc.fixed": {"accuracy"},
}


def test_registry_names_labels_metrics_and_prefixes():
    assert set(TASKS) == set(EXPECTED_LABELS) == set(ORIGINAL_NAMES)
    assert len(GLUE_TASKS) == 9 and len(SUPERGLUE_TASKS) == 8
    for name, labels in EXPECTED_LABELS.items():
        assert TASKS[name].label_names == labels, name
        assert TASKS[name].prefix == ORIGINAL_NAMES[name], name
        assert set(TASKS[name].metric_names) == ORIGINAL_METRICS[name], name
        assert get_task(ORIGINAL_NAMES[name]) is TASKS[name]  # the original's names resolve
    assert get_task("superglue_rte").tfds_name == "super_glue/rte"
    assert get_task("wsc.fixed").tfds_name == "super_glue/wsc.fixed"
    assert get_task("mnli").validation_split == "validation_mismatched"
    assert get_task("mnli").test_split == "validation_matched"
    assert {n for n, t in TASKS.items() if not t.is_small} == {"sst2", "qqp", "qnli", "record",
                                                              "mnli"}
    assert TASKS["cola"].metric_names == ("matthews_correlation",)


def test_aliases_and_unknown_task():
    assert get_task("superglue-rte").name == "superglue_rte"
    assert get_task("super_glue/cb").name == "cb"
    assert get_task("glue/rte").name == "rte"
    assert get_task(" RTE ").name == "rte"
    assert get_task("superglue-wsc.fixed").name == "wsc.fixed"
    assert get_task("superglue_record").name == "record"
    with pytest.raises(ValueError, match=r"unknown task 'mnli-mm'.*valid names:.*rte.*wsc\.fixed"):
        get_task("mnli-mm")


# One example per task and the original's source text for it, written out by hand.
# Local-data rows are the first rows of the shared files; the others are rows as printed on
# the datasets' cards (ReCoRD's and MultiRC's abbreviated), in the TFDS schema.
_MARIAM = ("Mariam has been in Badam Bagh prison for three months.\n@highlight\nMost of the 202 "
           "Badam Bagh inmates are jailed for so-called 'moral crimes'\n@highlight\n62 children "
           "live there\n@highlight\nFive others share")
LITERAL_CASES = [
    ("cola", {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
              "label": 1},
     "sentence: Our friends won't buy this analysis, let alone the next one we propose.", "1"),
    ("sst2", {"sentence": "hide new secretions from the parental units ", "label": 0},
     "sentence: hide new secretions from the parental units ", "0"),
    ("mrpc", {"sentence1": "Amrozi accused his brother, whom he called \"the witness\", of "
                           "deliberately distorting his evidence.",
              "sentence2": "Referring to him as only \"the witness\", Amrozi accused his brother "
                           "of deliberately distorting his evidence.", "label": 1},
     "sentence1: Amrozi accused his brother, whom he called \"the witness\", of deliberately "
     "distorting his evidence. sentence2: Referring to him as only \"the witness\", Amrozi "
     "accused his brother of deliberately distorting his evidence.", "1"),
    ("qqp", {"question1": "How is the life of a math student? Could you describe your own "
                          "experiences?",
             "question2": "Which level of prepration is enough for the exam jlpt5?", "label": 0},
     "question1: How is the life of a math student? Could you describe your own experiences? "
     "question2: Which level of prepration is enough for the exam jlpt5?", "0"),
    ("stsb", {"sentence1": "A man is playing a large flute.", "sentence2": "A man is playing a "
              "flute.", "label": 3.8},
     "sentence1: A man is playing a large flute. sentence2: A man is playing a flute.", "3.8"),
    # MNLI: the original writes "hypothesis" without a colon.
    ("mnli", {"premise": "Conceptually cream skimming has two basic dimensions - product and "
                         "geography.",
              "hypothesis": "Product and geography are what make cream skimming work. ",
              "label": 1},
     "premise: Conceptually cream skimming has two basic dimensions - product and geography. "
     "hypothesis Product and geography are what make cream skimming work. ", "1"),
    ("qnli", {"question": "What came into force after the new constitution was herald?",
              "sentence": "As of that day, the new constitution heralding the Second Republic "
                          "came into force.", "label": 0},
     "question: What came into force after the new constitution was herald? sentence: As of "
     "that day, the new constitution heralding the Second Republic came into force.", "0"),
    ("rte", {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
             "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": 1},
     "sentence1: No Weapons of Mass Destruction Found in Iraq Yet. sentence2: Weapons of Mass "
     "Destruction Found in Iraq.", "1"),
    ("wnli", {"sentence1": "The drain is clogged with hair. It has to be cleaned.",
              "sentence2": "The hair has to be cleaned.", "label": 0},
     "sentence1: The drain is clogged with hair. It has to be cleaned. sentence2: The hair has "
     "to be cleaned.", "0"),
    ("boolq", {"question": "does ethanol take more energy make that produces",
               "passage": "All biomass goes through at least some of these steps.", "label": 0},
     "question: does ethanol take more energy make that produces passage: All biomass goes "
     "through at least some of these steps.", "0"),
    ("cb", {"premise": "It was a complex language. Not written down but handed down. One might "
                       "say it was peeled down.",
            "hypothesis": "the language was peeled down", "label": 0},
     "premise: It was a complex language. Not written down but handed down. One might say it "
     "was peeled down. hypothesis: the language was peeled down", "0"),
    # COPA: the original leaves out `question` ("cause").
    ("copa", {"premise": "My body cast a shadow over the grass.", "choice1": "The sun was rising.",
              "choice2": "The grass was cut.", "question": "cause", "label": 0},
     "premise: My body cast a shadow over the grass. choice1: The sun was rising. choice2: The "
     "grass was cut.", "0"),
    # MultiRC: markup removed per field ("<br>" -> " ", "<b>"/"</b>" dropped).
    ("multirc", {"paragraph": "<b>Sent 1: </b>What causes a change in motion?<br><b>Sent 2: </b>"
                              "The application of a force.<br>",
                 "question": "What do you apply to an object to make it move or stop?",
                 "answer": "A force", "label": 1,
                 "idx": {"paragraph": 0, "question": 1, "answer": 7}},
     "question: What do you apply to an object to make it move or stop? answer: A force "
     "paragraph: Sent 1: What causes a change in motion? Sent 2: The application of a force. ",
     "1"),
    # ReCoRD: "record" always starts the input; "<punct>\n@highlight\n" -> "<punct> ",
    # any other "\n@highlight\n" -> ". ".
    ("record", {"passage": _MARIAM, "query": "@placeholder has refused.",
                "entities": ["Afghanistan", "Badam Bagh", "Mariam", "Nuria"],
                "answers": ["Nuria"], "idx": {"passage": 0, "query": 0}},
     "record query: @placeholder has refused. entities: Afghanistan, Badam Bagh, Mariam, Nuria "
     "passage: Mariam has been in Badam Bagh prison for three months. Most of the 202 Badam Bagh "
     "inmates are jailed for so-called 'moral crimes' 62 children live there. Five others share",
     "Nuria"),
    ("superglue_rte", {"premise": "No Weapons of Mass Destruction Found in Iraq Yet.",
                       "hypothesis": "Weapons of Mass Destruction Found in Iraq.", "label": 1},
     "premise: No Weapons of Mass Destruction Found in Iraq Yet. hypothesis: Weapons of Mass "
     "Destruction Found in Iraq.", "1"),
    ("wic", {"word": "place", "sentence1": "Do you want to come over to my place later?",
             "sentence2": "A political system with no place for the less prominent groups.",
             "label": 0},
     "sentence1: Do you want to come over to my place later? sentence2: A political system "
     "with no place for the less prominent groups. word: place", "0"),
    # WSC: "* span1 *", then "# span2 #" at span2_index + 2 (span1 came first).
    ("wsc.fixed", {"text": "Mark told Pete many lies about himself, which Pete included in his "
                           "book. He should have been more truthful.",
                   "span1_index": 0, "span1_text": "Mark", "span2_index": 13,
                   "span2_text": "He", "label": 1},
     "text: * Mark * told Pete many lies about himself, which Pete included in his book. # He # "
     "should have been more truthful.", "1"),
]


@pytest.mark.parametrize("name,example,source,target", LITERAL_CASES,
                         ids=[c[0] for c in LITERAL_CASES])
def test_formats_as_the_original(name, example, source, target):
    task = get_task(name)
    assert task.format(example) == (source, target)
    prefixed = f"{ORIGINAL_NAMES[name]} {source}"  # seq2seq_format: [name] + sources, " "-joined
    assert task.format(example, add_prefix=True) == (prefixed, target)
    assert task.source(example, add_prefix=True) == prefixed
    assert task.format_all(example, add_prefix=True) == [(prefixed, target)]


def test_every_task_has_a_literal_case():
    assert {c[0] for c in LITERAL_CASES} == set(TASKS)


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


def _original_stsb_target(raw: str) -> str:
    # HF datasets / TFDS store the score as float32; then str(round_stsb_target(label)), i.e.
    # str(np.round((label * 5) / 5, decimals=1)) in the original.
    label = float(np.float32(float(raw)))
    return str(np.round((label * 5) / 5, decimals=1))


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
     lambda c: (f"sentence1: {c[7]} sentence2: {c[8]}", _original_stsb_target(c[9]))),
    ("stsb", "validation", "STS-B/dev.tsv", True,
     lambda c: (f"sentence1: {c[7]} sentence2: {c[8]}", _original_stsb_target(c[9]))),
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
        want_source, want_target = expect(cols)
        assert task.format(ex) == (want_source, want_target)
        assert task.format(ex, add_prefix=True) == (f"{name} {want_source}", want_target)
        if name == "stsb":  # the reference is the rounded target the original decodes
            assert task.reference(ex) == float(want_target)
            assert task.parse_prediction(want_target) == float(want_target)
        else:
            assert task.parse_prediction(want_target) == ex["label"] == int(want_target)


def test_stsb_float32_rounding_on_the_real_row(files_source):
    # STS-B train line 279 scores 0.850: float32 0.85 > 0.85, so the original's target is
    # "0.9" (float64 0.85 < 0.85 would round to "0.8").
    ex = files_source.load("stsb", "train")[277]
    assert (ex["sentence1"], ex["label"]) == ("A man is rowing a boat.", 0.85)
    assert get_task("stsb").format(ex)[1] == "0.9"


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
                                f"choice2: {r['choice2']}", str(r["label"]))),
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
            source, target = expect(r)
            assert task.format(ex) == (source, target)
            assert task.format(ex, add_prefix=True) == (f"superglue-{folder.lower()} {source}",
                                                        target)
            assert task.parse_prediction(target) == ex["label"]


def test_parse_prediction_compares_strings_as_the_original():
    rte, cb, stsb, record = (get_task(n) for n in ("rte", "cb", "stsb", "record"))
    assert rte.parse_prediction(" 1 \n") == 1 and rte.parse_prediction("0") == 0
    # "01" / "00" are not the label string "1" / "0" (the original compares strings).
    for junk in ["", "2", "-1", "01", "00", "+1", "entailment", "1.0", "0 1", "１", None, "\x00"]:
        assert rte.parse_prediction(junk) == INVALID_LABEL, junk
    assert cb.parse_prediction("2") == 2 and cb.parse_prediction("3") == INVALID_LABEL
    # STS-B: string_to_float, default -1.0 only when float() raises.
    assert stsb.parse_prediction("3.8") == pytest.approx(3.8)
    assert stsb.parse_prediction(" 4 ") == 4.0 and stsb.parse_prediction("1_0") == 10.0
    assert np.isnan(stsb.parse_prediction("nan")) and stsb.parse_prediction("inf") == np.inf
    for junk in ["", "abc", "3.8.1", "3,8"]:
        assert stsb.parse_prediction(junk) == INVALID_SCORE
    assert record.parse_prediction("  Barack Obama ") == "Barack Obama"


def test_stsb_targets_as_round_stsb_target():
    stsb = get_task("stsb")
    # Hand-worked: np.round rounds the binary value half to even at one decimal.
    cases = {5.0: "5.0", 5: "5.0", 3.8: "3.8", 0.0: "0.0", 4.75: "4.8", 0.25: "0.2",
             2.333: "2.3", 1.96: "2.0", 0.85: "0.9", 2.25: "2.2", 3.75: "3.8", 0.35: "0.3"}
    for score, want in cases.items():
        ex = {"sentence1": "a", "sentence2": "b", "label": score}
        assert stsb.format(ex)[1] == stsb_target(score) == want, score
        assert stsb.reference(ex) == float(want)
    assert round_stsb_target(3.75) == 3.8 and round_stsb_target(0.85) == 0.8  # float64 input
    assert stsb.format({"sentence1": "a", "sentence2": "b", "label": -1.0})[1] == ""


class _CountingTokenizer:
    """Stand-in with a known `encode`: one id per character plus EOS."""

    def encode(self, text):
        return [ord(ch) for ch in text] + [1]


def test_max_target_length_from_the_label_lists():
    fake = _CountingTokenizer()
    for name in ("rte", "cola", "mnli", "cb", "copa", "multirc", "wsc.fixed"):
        assert get_task(name).max_target_length(fake) == 2  # "0" + EOS
    # STS-B's labels_list: str(np.round(x, 1)) for x in np.arange(0, 5.2, 0.2).
    want = ("0.0", "0.2", "0.4", "0.6", "0.8", "1.0", "1.2", "1.4", "1.6", "1.8", "2.0", "2.2",
            "2.4", "2.6", "2.8", "3.0", "3.2", "3.4", "3.6", "3.8", "4.0", "4.2", "4.4", "4.6",
            "4.8", "5.0")
    assert get_task("stsb").label_texts == want
    assert get_task("stsb").max_target_length(fake) == 4
    assert get_task("record").label_texts is None
    assert get_task("record").max_target_length(fake) == 128
    assert get_task("record").max_target_length(fake, default=64) == 64


def test_max_target_length_with_the_t5_vocabulary(tokenizer):
    # "0" -> "▁", "0", "</s>" = [3, 632, 1]; "1" -> [209, 1]; STS-B "3.8" -> [3, 26195, 1].
    assert tokenizer.encode("0") == [3, 632, 1] and tokenizer.encode("1") == [209, 1]
    assert tokenizer.encode("3.8") == [3, 26195, 1]
    assert {name: get_task(name).max_target_length(tokenizer)
            for name in ("rte", "mnli", "cb", "stsb", "record")} == {
        "rte": 3, "mnli": 3, "cb": 3, "stsb": 3, "record": 128}


def test_encode_threads_add_prefix(tokenizer):
    rows = [LITERAL_CASES[7][1]]  # the RTE case
    plain = encode("rte", rows, tokenizer, max_source_length=64, max_target_length=3)
    prefixed = encode("rte", rows, tokenizer, max_source_length=64, max_target_length=3,
                      add_prefix=True)
    want = tokenizer(["rte " + LITERAL_CASES[7][2]])["input_ids"][0]
    assert prefixed.input_ids[0, :len(want)].tolist() == want
    assert plain.input_ids[0, :len(want) - 1].tolist() != want[:len(want) - 1]
    np.testing.assert_array_equal(plain.labels, prefixed.labels)


def test_bad_examples_raise_clear_errors():
    copa = get_task("copa")
    with pytest.raises(KeyError, match="lacks field 'choice2'"):
        copa.format({"premise": "P", "choice1": "A", "label": 1})
    with pytest.raises(ValueError, match=r"task cb: field 'premise' is NoneType None, expected "
                                         r"text"):
        get_task("cb").format({"premise": None, "hypothesis": "h", "label": 0})
    with pytest.raises(ValueError, match="out of range"):
        get_task("rte").format({"sentence1": "a", "sentence2": "b", "label": 2})
    assert get_task("rte").format({"sentence1": "a", "sentence2": "b", "label": -1})[1] == ""


def test_multirc_groups_and_record_targets():
    multirc = get_task("multirc")
    ex = LITERAL_CASES[12][1]
    assert multirc.group(ex) == 1 and get_task("rte").group(ex) is None  # question index
    record = get_task("record")
    ex = {"passage": "Top story.\n@highlight\nCats rule\n@highlight\nDogs drool",
          "query": "@placeholder rules.", "entities": ["Cats", "Dogs"],
          "answers": ["Cats", "cats", "Cats"], "idx": {"passage": 0, "query": 0}}
    source = ("record query: @placeholder rules. entities: Cats, Dogs passage: Top story. "
              "Cats rule. Dogs drool")
    assert record.format(ex) == (source, "Cats")
    assert record.format_all(ex) == [(source, "Cats"), (source, "cats")]
    assert record.format_all(ex, add_prefix=True)[1] == ("superglue-record " + source, "cats")
    assert record.reference(ex) == ("Cats", "cats")
    wsc = get_task("wsc.fixed")  # T5's docstring example (span2 before span1)
    ex = {"text": "This is a test sentence .", "span1_text": "test", "span1_index": 3,
          "span2_text": "This", "span2_index": 0, "label": 0}
    assert wsc.format(ex) == ("text: # This # is a * test * sentence .", "0")
