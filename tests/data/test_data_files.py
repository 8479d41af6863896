"""The "files" source: row/label counts against SOURCES.md, GLUE quirks, and clear errors."""

import collections
import json

import pytest

from compacter_jax.data import DataError, FilesSource, make_source
from compacter_jax.paths import DATA_DIR_ENV

# (task, split, rows, label counts by index) — numbers from SOURCES.md.
COUNTS = [
    ("cola", "train", 8551, {1: 6023, 0: 2528}),
    ("cola", "validation", 1043, {1: 721, 0: 322}),
    ("cola", "test", 1063, {-1: 1063}),
    ("sst2", "train", 67349, {1: 37569, 0: 29780}),
    ("sst2", "validation", 872, {1: 444, 0: 428}),
    ("mrpc", "train", 3668, {1: 2474, 0: 1194}),
    ("mrpc", "validation", 408, {1: 279, 0: 129}),
    ("mrpc", "test", 1725, {-1: 1725}),
    ("stsb", "train", 5749, None),
    ("stsb", "validation", 1500, None),
    ("rte", "train", 2490, {0: 1249, 1: 1241}),  # 0 = entailment
    ("rte", "validation", 277, {0: 146, 1: 131}),
    ("rte", "test", 3000, {-1: 3000}),
    ("qnli", "validation", 5463, {0: 2702, 1: 2761}),
    ("wnli", "train", 635, None),
    ("wnli", "validation", 71, {0: 40, 1: 31}),
    ("wnli", "test", 146, {-1: 146}),
    ("cb", "train", 250, {0: 115, 1: 119, 2: 16}),
    ("cb", "validation", 56, {0: 23, 1: 28, 2: 5}),
    ("copa", "train", 400, None),
    ("copa", "validation", 100, None),
    ("boolq", "validation", 3270, None),
]


@pytest.mark.parametrize("task,split,rows,labels", COUNTS, ids=[f"{c[0]}-{c[1]}" for c in COUNTS])
def test_counts_match_sources_md(files_source, task, split, rows, labels):
    examples = files_source.load(task, split)
    assert len(examples) == rows
    if labels is not None:
        assert dict(collections.Counter(ex["label"] for ex in examples)) == labels


def test_glue_quirks(files_source):
    mrpc = files_source.load("mrpc", "train")
    assert mrpc[0]["sentence1"].startswith("Amrozi accused his brother, whom he called \"the")
    assert not any("\ufeff" in v for ex in mrpc for v in ex.values() if isinstance(v, str))
    # bare quotes survive (no CSV quote handling)
    assert files_source.load("mrpc", "validation")[0]["sentence2"].startswith('"The foodservice')
    assert files_source.load("sst2", "train")[0]["sentence"] == (
        "hide new secretions from the parental units ")
    stsb = files_source.load("stsb", "train")
    assert stsb[1]["label"] == 3.8 and all(0.0 <= ex["label"] <= 5.0 for ex in stsb)
    assert [ex["idx"] for ex in files_source.load("rte", "validation")] == list(range(277))
    assert files_source.load("boolq", "validation")[0]["label"] == 0  # "answer": false


def test_cache_returns_fresh_lists(files_source):
    a, b = files_source.load("cb", "train"), files_source.load("cb", "train")
    assert a == b and a is not b


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


RTE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


def test_malformed_tsv_rows_name_file_and_line(tmp_path):
    src = FilesSource(tmp_path)
    path = _write(tmp_path / "glue/RTE/train.tsv",
                  RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tnot_entailment\n")
    with pytest.raises(DataError, match=rf"{path}:3: expected 4 tab-separated fields.*got 3"):
        src.load("rte", "train")
    _write(path, RTE_HEADER + "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=rf"{path}:3: label 'maybe' is not a valid rte label"):
        FilesSource(tmp_path).load("rte", "train")
    _write(path, RTE_HEADER + "0\ta\tb\tentailment\n\n1\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=rf"{path}:3: empty line"):
        FilesSource(tmp_path).load("rte", "train")
    _write(path, RTE_HEADER + "0\ta\tb\t\n")
    with pytest.raises(DataError, match=rf"{path}:2: missing label in split 'train'"):
        FilesSource(tmp_path).load("rte", "train")
    cola = _write(tmp_path / "glue/CoLA/dev.tsv", "gj04\t1\t\tFine.\ngj04\t7\t*\tBad label.\n")
    with pytest.raises(DataError, match=rf"{cola}:2: label '7'"):
        FilesSource(tmp_path).load("cola", "validation")
    stsb = _write(tmp_path / "glue/STS-B/dev.tsv",
                  "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                  "sentence2\tscore\n0\tg\tf\ty\t0\tn\tn\ta\tb\tfive\n")
    with pytest.raises(DataError, match=rf"{stsb}:2: label 'five' is not a number"):
        FilesSource(tmp_path).load("stsb", "validation")
    bad_header = _write(tmp_path / "glue/QNLI/dev.tsv", "index\tq\ts\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=rf"{bad_header}:1: expected a header"):
        FilesSource(tmp_path).load("qnli", "validation")


def test_malformed_jsonl_rows_name_file_and_line(tmp_path):
    path = tmp_path / "superglue/CB/train.jsonl"
    good = json.dumps({"premise": "p", "hypothesis": "h", "idx": 0, "label": 0})
    _write(path, good + "\n{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        FilesSource(tmp_path).load("cb", "train")
    _write(path, good + "\n" + json.dumps({"premise": "p", "idx": 1, "label": 0}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: missing field\(s\) \['hypothesis'\]"):
        FilesSource(tmp_path).load("cb", "train")
    _write(path, json.dumps({"premise": "p", "hypothesis": "h", "label": 3}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: label 3 is not a valid cb label"):
        FilesSource(tmp_path).load("cb", "train")
    _write(path, "[1, 2]\n")
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object"):
        FilesSource(tmp_path).load("cb", "train")


def test_original_superglue_layouts_are_normalised(tmp_path):
    _write(tmp_path / "superglue/CB/val.jsonl",
           json.dumps({"premise": "p", "hypothesis": "h", "idx": 4, "label": "neutral"}) + "\n")
    assert FilesSource(tmp_path).load("cb", "validation") == [
        {"premise": "p", "hypothesis": "h", "label": 2, "idx": 4}]
    _write(tmp_path / "superglue/WSC/val.jsonl", json.dumps(
        {"text": "A b c", "idx": 0, "label": True, "target": {
            "span1_text": "A", "span1_index": 0, "span2_text": "c", "span2_index": 2}}) + "\n")
    assert FilesSource(tmp_path).load("wsc.fixed", "validation")[0]["label"] == 1
    multirc = {"idx": 5, "passage": {"text": "T", "questions": [
        {"question": "Q", "idx": 9, "answers": [{"text": "A1", "idx": 0, "label": 0},
                                                 {"text": "A2", "idx": 1, "label": 1}]}]}}
    _write(tmp_path / "superglue/MultiRC/val.jsonl", json.dumps(multirc) + "\n")
    rows = FilesSource(tmp_path).load("multirc", "validation")
    assert [(r["answer"], r["label"], r["idx"]["question"]) for r in rows] == [
        ("A1", 0, 9), ("A2", 1, 9)]
    record = {"idx": 2, "passage": {"text": "Cats and Dogs.", "entities": [
        {"start": 0, "end": 3}, {"start": 9, "end": 12}]}, "qas": [
        {"query": "@placeholder bark", "idx": 7, "answers": [{"start": 9, "end": 12,
                                                               "text": "Dogs"}]}]}
    _write(tmp_path / "superglue/ReCoRD/val.jsonl", json.dumps(record) + "\n")
    (row,) = FilesSource(tmp_path).load("record", "validation")
    assert row["entities"] == ["Cats", "Dogs"] and row["answers"] == ["Dogs"]


def test_empty_split(tmp_path):
    _write(tmp_path / "glue/RTE/dev.tsv", RTE_HEADER)
    with pytest.raises(DataError, match=r"dev\.tsv: split 'validation' of rte has no examples"):
        FilesSource(tmp_path).load("rte", "validation")
    _write(tmp_path / "glue/RTE/train.tsv", "")
    with pytest.raises(DataError, match=r"train\.tsv: file is empty"):
        FilesSource(tmp_path).load("rte", "train")
    _write(tmp_path / "superglue/CB/val.jsonl", "\n\n")
    with pytest.raises(DataError, match="has no examples"):
        FilesSource(tmp_path).load("cb", "validation")


def test_missing_data_dir_and_file(tmp_path, shared_data):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"data directory not found: {missing};.*{DATA_DIR_ENV}"
                                        r".*`data_dir`"):
        make_source("files", data_dir=missing).load("rte", "train")
    qnli_train = shared_data / "glue" / "QNLI" / "train.tsv"  # not in the shared data
    if not qnli_train.exists():
        with pytest.raises(DataError, match=rf"data file not found: {qnli_train};.*{DATA_DIR_ENV}"):
            FilesSource(shared_data).load("qnli", "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        FilesSource(shared_data).load("rte", "dev")


def test_make_source_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown data source 'hub'; valid: files, tfds, auto"):
        make_source("hub")
    with pytest.raises(ValueError, match="only applies to the 'tfds' and 'auto' sources"):
        make_source("files", download=True)


STSB_HEADER = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
               "\tscore\n")


def _stsb_row(score: str, i: int = 0) -> str:
    return f"{i}\tg\tf\ty\t0\tn\tn\ta\tb\t{score}\n"


def _cb(**fields) -> str:
    row = {"premise": "p", "hypothesis": "h", "idx": 0, "label": 0}
    row.update(fields)
    return json.dumps(row) + "\n"


_GOOD_CB = _cb()
# (case id, file under the data dir, task, split, file bytes, error regex after "<path>")
ROBUSTNESS_CASES = [
    ("latin1-tsv", "glue/RTE/train.tsv", "rte", "train",
     (RTE_HEADER + "0\ta\tb\tentailment\n1\tcaf\u00e9\tb\tentailment\n").encode("latin-1"),
     # offset: header 32 bytes + row 17 bytes + "1\tcaf" 5 bytes = 54
     r":3: byte offset 54 \(0xe9\): not valid UTF-8 .*the file must be UTF-8"),
    ("latin1-after-bom", "glue/MRPC/dev.tsv", "mrpc", "validation",
     b"\xef\xbb\xbfQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tna\xefve\tb\n",
     # offset counts the BOM: 3 + header 40 + "1\t1\t2\tna" 8 = 51
     r":2: byte offset 51 \(0xef\): not valid UTF-8 \(invalid continuation byte\)"),
    ("binary-jsonl", "superglue/CB/train.jsonl", "cb", "train",
     b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
     r":1: byte offset 0 \(0x89\): not valid UTF-8 \(invalid start byte\); the file must be "
     r"UTF-8"),
    ("latin1-jsonl-line2", "superglue/CB/train.jsonl", "cb", "train",
     _GOOD_CB.encode() + '{"premise": "d\u00e9j\u00e0", "hypothesis": "h", "label": 0}\n'
     .encode("latin-1"),
     r":2: byte offset \d+ \(0xe9\): not valid UTF-8"),
    ("cr-only-tsv", "glue/RTE/train.tsv", "rte", "train",
     (RTE_HEADER + "0\ta\tb\tentailment\n").replace("\n", "\r").encode(),
     r": lines end in a bare carriage return .*convert the line endings"),
    ("cr-only-jsonl", "superglue/CB/val.jsonl", "cb", "validation",
     (_GOOD_CB * 3).replace("\n", "\r").encode(), r": lines end in a bare carriage return"),
    ("stsb-inf", "glue/STS-B/train.tsv", "stsb", "train",
     (STSB_HEADER + _stsb_row("5.000") + _stsb_row("inf", 1)).encode(),
     r":3: stsb score 'inf' is outside 0\.\.5"),
    ("stsb-minus-one", "glue/STS-B/train.tsv", "stsb", "train",
     (STSB_HEADER + _stsb_row("-1")).encode(), r":2: stsb score '-1' is outside 0\.\.5"),
    ("stsb-7.5", "glue/STS-B/dev.tsv", "stsb", "validation",
     (STSB_HEADER + _stsb_row("0.000") + _stsb_row("3.8", 1) + _stsb_row("7.5", 2)).encode(),
     r":4: stsb score '7\.5' is outside 0\.\.5"),
    ("stsb-nan", "glue/STS-B/dev.tsv", "stsb", "validation",
     (STSB_HEADER + _stsb_row("NaN")).encode(), r":2: stsb score 'NaN' is outside 0\.\.5"),
    ("cb-null-premise", "superglue/CB/train.jsonl", "cb", "train",
     (_GOOD_CB + _cb(premise=None)).encode(),
     r":2: field 'premise' is null \(None\), expected a string"),
    ("cb-number-hypothesis", "superglue/CB/train.jsonl", "cb", "train",
     _cb(hypothesis=3).encode(), r":1: field 'hypothesis' is a number \(3\), expected a string"),
    ("copa-list-choice", "superglue/COPA/val.jsonl", "copa", "validation",
     (json.dumps({"premise": "p", "choice1": ["a"], "choice2": "b", "question": "cause",
                  "label": 0}) + "\n").encode(), r":1: field 'choice1' is a list"),
    ("wsc-string-index", "superglue/WSC/train.jsonl", "wsc.fixed", "train",
     (json.dumps({"text": "A b c", "span1_index": "0", "span2_index": 2, "span1_text": "A",
                  "span2_text": "c", "label": 0}) + "\n").encode(),
     r":1: field 'span1_index' is a string \('0'\), expected an integer"),
    ("multirc-null-answer", "superglue/MultiRC/val.jsonl", "multirc", "validation",
     (json.dumps({"idx": 0, "passage": {"text": "T", "questions": [
         {"question": "Q", "idx": 0, "answers": [{"text": None, "idx": 0, "label": 0}]}]}})
      + "\n").encode(), r":1: field 'answer' is null"),
    ("record-null-entities", "superglue/ReCoRD/val.jsonl", "record", "validation",
     (json.dumps({"passage": "P", "query": "@placeholder", "entities": None, "answers": ["P"],
                  "idx": {"passage": 0, "query": 0}}) + "\n").encode(),
     r":1: field 'entities' is null \(None\), expected a list of strings"),
    ("record-number-answer", "superglue/ReCoRD/val.jsonl", "record", "validation",
     (json.dumps({"passage": "P", "query": "@placeholder", "entities": ["P"], "answers": [1],
                  "idx": {"passage": 0, "query": 0}}) + "\n").encode(),
     r":1: field 'answers' must be a list of strings, got \[1\]"),
]


@pytest.mark.parametrize("case,rel,task,split,data,error", ROBUSTNESS_CASES,
                         ids=[c[0] for c in ROBUSTNESS_CASES])
def test_bad_files_raise_data_error_naming_file_and_line(tmp_path, case, rel, task, split, data,
                                                         error):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{path}{error}"):
        FilesSource(tmp_path).load(task, split)


def test_good_edge_cases_still_load(tmp_path):
    # Scores at the ends of 0..5, CRLF line ends, and a BOM before a JSONL file load.
    _write(tmp_path / "glue/STS-B/dev.tsv",
           (STSB_HEADER + _stsb_row("0.000") + _stsb_row("5.000", 1)).replace("\n", "\r\n"))
    rows = FilesSource(tmp_path).load("stsb", "validation")
    assert [r["label"] for r in rows] == [0.0, 5.0] and rows[1]["sentence2"] == "b"
    (tmp_path / "superglue/CB").mkdir(parents=True)
    (tmp_path / "superglue/CB/val.jsonl").write_bytes(b"\xef\xbb\xbf" + _GOOD_CB.encode())
    assert FilesSource(tmp_path).load("cb", "validation")[0]["premise"] == "p"


def test_data_dir_may_be_the_root_or_the_glue_or_superglue_folder(shared_data):
    from compacter_jax.data import FilesSource

    root = FilesSource(shared_data).load("rte", "validation")
    assert FilesSource(shared_data / "glue").load("rte", "validation") == root
    cb = FilesSource(shared_data).load("cb", "validation")
    assert FilesSource(shared_data / "superglue").load("cb", "validation") == cb
    assert FilesSource.is_files_layout(shared_data)
    assert FilesSource.is_files_layout(shared_data / "glue")
    assert not FilesSource.is_files_layout(shared_data / "t5_vocab")
