"""The "tfds" source, offline: builders resolve without TensorFlow, their label names match the
registry, unprepared data gives a clear error, and data prepared (array_record) from the local
files by the *real* TFDS GLUE parsing code reads back equal to the "files" source."""

import importlib.util

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
import tensorflow_datasets.text.glue as tfds_glue  # noqa: E402

from compacter_jax.data import DataError, FilesSource, TfdsSource, get_task  # noqa: E402
from compacter_jax.data.tasks import GLUE_TASKS  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None
# super_glue configs other than multirc/record use tf.int32 in _info: not describable without TF.
DESCRIBABLE = GLUE_TASKS + ("multirc", "record")


@pytest.mark.parametrize("name", DESCRIBABLE)
def test_builder_label_names_match_registry(tmp_path, name):
    source = TfdsSource(tmp_path)
    assert source.builder(name).info.full_name.startswith(get_task(name).tfds_name)
    assert source.label_names(name) == get_task(name).label_names


def test_unprepared_data_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"glue/rte is not prepared in .*download=True.*"
                                        r"tfds build glue/rte --file_format=array_record"):
        TfdsSource(tmp_path, download=False).load("rte", "train")


@pytest.mark.skipif(HAS_TF, reason="only meaningful without TensorFlow")
def test_superglue_without_tf_and_unprepared_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"cannot describe super_glue/cb without TensorFlow.*"
                                        r"'files' source"):
        TfdsSource(tmp_path).load("cb", "validation")


def _copy_head(src, dst, rows=25):
    """Header (if any) and the first `rows` data rows of a GLUE TSV."""
    lines = src.read_text(encoding="utf-8").split("\n")
    has_header = not src.parent.name == "CoLA"
    keep = lines[: rows + int(has_header)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(keep) + "\n", encoding="utf-8")


def _prepare_glue_from_files(config: str, folder, data_dir):
    """Runs TFDS's own GLUE builder code over local TSVs (no download) into array_record."""

    class Glue(tfds_glue.Glue, skip_registration=True):
        def _split_generators(self, dl_manager):
            out = {}
            for split, fname, arg in (("train", "train.tsv", "train"),
                                      ("validation", "dev.tsv", "dev")):
                if (folder / fname).is_file():
                    out[split] = self._generate_examples(str(folder / fname), arg)
            return out

    builder = Glue(config=config, data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


GLUE_DIRS = {"cola": "CoLA", "sst2": "SST-2", "stsb": "STS-B", "rte": "RTE", "qnli": "QNLI",
             "wnli": "WNLI"}


@pytest.mark.parametrize("name", sorted(GLUE_DIRS))
def test_prepared_glue_reads_like_the_files(shared_data, tmp_path, name):
    task = get_task(name)
    folder = tmp_path / "files" / "glue" / GLUE_DIRS[name]
    splits = []
    for split, fname in (("train", "train.tsv"), ("validation", "dev.tsv")):
        src = shared_data / "glue" / GLUE_DIRS[name] / fname
        if src.is_file():
            _copy_head(src, folder / fname)
            splits.append(split)
    _prepare_glue_from_files(name, folder, tmp_path / "tfds")
    files, tfds_src = FilesSource(tmp_path / "files"), TfdsSource(tmp_path / "tfds")
    for split in splits:
        a, b = files.load(task, split), tfds_src.load(task, split)
        assert len(a) == len(b) == 25
        for x, y in zip(a, b):
            assert x["idx"] == y["idx"]
            assert task.format(x) == task.format(y)  # same text and same target string
            assert np.isclose(x["label"], y["label"], atol=1e-6)  # STS-B: float32 in TFDS


def _prepare_fake_super_glue(config: str, label_names, rows, data_dir):
    """A TF-free stand-in for a prepared super_glue/<config> (same features as TFDS)."""

    class SuperGlue(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.2")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "premise": tfds.features.Text(), "hypothesis": tfds.features.Text(),
                "idx": np.int32, "label": tfds.features.ClassLabel(names=label_names)}))

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for r in rows:
                yield r["idx"], {k: r[k] for k in ("premise", "hypothesis", "idx", "label")}

    SuperGlue(config=config, data_dir=str(data_dir), file_format="array_record"
              ).download_and_prepare()


def test_prepared_superglue_opens_from_directory(files_source, tmp_path):
    task = get_task("cb")
    rows = files_source.load(task, "validation")
    _prepare_fake_super_glue("cb", list(task.label_names), rows, tmp_path / "ok")
    assert TfdsSource(tmp_path / "ok").load(task, "validation") == rows
    # A prepared copy whose label order differs from the registry is refused.
    _prepare_fake_super_glue("cb", ["contradiction", "entailment", "neutral"], rows,
                             tmp_path / "bad")
    with pytest.raises(DataError, match="label names .* differ from the registry"):
        TfdsSource(tmp_path / "bad").load(task, "validation")
    with pytest.raises(DataError, match="has no split 'train'"):
        TfdsSource(tmp_path / "ok").load(task, "train")
