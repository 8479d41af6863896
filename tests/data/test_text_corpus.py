"""The unlabelled text corpora of the pretraining corpus (compacter_jax.data.corpus
`text_documents` and `corpus_documents(texts=...)`)."""

from __future__ import annotations

import re
import zipfile

import pytest

from compacter_jax.data import DataError, make_source, paper_splits
from compacter_jax.data import corpus as corpus_lib


def _zip(root, name, entries):
    (root / "text").mkdir(exist_ok=True)
    with zipfile.ZipFile(root / "text" / f"{name}.zip", "w") as zf:
        for path, text in entries.items():
            zf.writestr(path, text)


def test_text_documents_clean_each_layout_and_pack_lines(tmp_path):
    _zip(tmp_path, "brown", {"brown/ca01": "The/at jury/nn said/vbd ./.\n\n\tIt/pps ran/vbd ./.\n",
                             "brown/cats.txt": "ca01 news\n", "brown/README": "about\n"})
    _zip(tmp_path, "pros_cons", {"pros_cons/IntegratedPros.txt": "  <Pros>Easy to use</Pros>\n",
                                 "pros_cons/README.txt": "x\n"})
    _zip(tmp_path, "product_reviews_1", {"product_reviews_1/a.txt":
                                         "* header line\n[t]\nzoom[+2]##Great zoom.\n##Fine.\n"})
    words = " ".join(["w"] * 150)
    _zip(tmp_path, "movie_reviews", {"movie_reviews/neg/cv000.txt": f"{words}\n{words}\nend .\n"})
    docs = corpus_lib.text_documents(tmp_path, ("brown", "pros_cons", "product_reviews_1",
                                                "movie_reviews"))
    assert docs["brown"] == ["The jury said .", "It ran ."]  # tags gone; blank line splits
    assert docs["pros_cons"] == ["Easy to use"]
    assert docs["product_reviews_1"] == ["Great zoom. Fine."]
    # 150 + 150 words exceed 200: the second line starts a new document.
    assert docs["movie_reviews"] == [words, f"{words} end ."]
    with pytest.raises(DataError, match="abc.zip"):
        corpus_lib.text_documents(tmp_path, ("abc",))
    with pytest.raises(ValueError, match="unknown text source"):
        corpus_lib.text_documents(tmp_path, ("wikipedia",))


def test_text_documents_overlapping_evaluation_text_are_dropped(shared_data):
    source = make_source("files", data_dir=shared_data)
    # A short validation sentence (under an n-gram) quoted inside a longer document.
    sentence = next(ex["sentence"] for ex in paper_splits("sst2", source)["validation"]
                    if corpus_lib.CONTAINED_MIN_WORDS <= len(ex["sentence"].split())
                    < corpus_lib.CONTAMINATION_NGRAM)
    long_test = next(ex["sentence1"] for ex in paper_splits("rte", source)["test"]
                     if len(ex["sentence1"].split()) > 30)
    window = " ".join(long_test.split()[5:5 + corpus_lib.CONTAMINATION_NGRAM])
    clean = "a plain sentence about nothing in particular that no split holds"
    texts = {"t": [f"the review said {sentence} and more", f"intro {window} outro", clean,
                   clean.upper()]}
    docs = corpus_lib.corpus_documents(source, ["cb"], texts=texts, heldout_fraction=0.05)
    stats = docs.stats["per_task"]["text:t"]
    assert stats["rows"] == 4 and stats["contaminated"] == 2 and stats["duplicates"] == 1
    assert [t for t, task in zip(docs.texts, docs.task_of) if task == "text:t"] == [clean]


def test_every_text_source_reads(shared_data):
    docs = corpus_lib.text_documents(shared_data)
    assert set(docs) == set(corpus_lib.TEXT_SOURCES)
    words = {k: sum(len(d.split()) for d in v) for k, v in docs.items()}
    assert 4_000_000 < sum(words.values()) < 6_000_000 and min(words.values()) > 10_000
    brown = " ".join(docs["brown"])
    assert " the " in brown and not re.search(r"\b(the|of)/", brown)  # POS tags stripped
    assert not any("<Pros>" in d or "<Cons>" in d for d in docs["pros_cons"])
    # Annotations are cut before each line's first "##"; a few lines of the originals hold
    # several annotated sentences, whose inner annotations stay (a known, small residue).
    reviews = docs["product_reviews_1"] + docs["product_reviews_2"]
    assert sum("##" in d for d in reviews) < 0.1 * len(reviews)
    assert max(len(d.split()) for v in docs.values() for d in v) <= 1000
