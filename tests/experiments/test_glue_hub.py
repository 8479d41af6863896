"""`make run`'s default model as a user gets it: served by the Hub (here the fake Hub on
127.0.0.1, tests/hub_server.py, playing google-t5/t5-base) it is downloaded and trained, no
fallback; with the Hub out of reach it falls back, with a banner, to the embedded backbone and
its own tokenizer, in a data folder that has no t5_vocab/."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from hub_server import FakeHub, point_client_at, tiny_t5_files
from safetensors.numpy import load as load_safetensors
from tiny_runs import fast_compiles, tiny_config

from compacter_jax.models import from_pretrained
from compacter_jax.models.hf_io import ModelNotCachedError
from compacter_jax.paths import checkpoints_dir
from experiments import backbone, glue
from experiments.configs.glue import DEFAULT_MODEL, get_config


@pytest.fixture
def data_without_vocab(shared_data, tmp_path, monkeypatch):
    """$COMPACTER_DATA_DIR with a 30-row RTE train set and its dev set, and no t5_vocab/."""
    root = tmp_path / "data"
    (root / "glue" / "RTE").mkdir(parents=True)
    source = shared_data / "glue" / "RTE"
    lines = (source / "train.tsv").read_text().splitlines()
    (root / "glue" / "RTE" / "train.tsv").write_text("\n".join(lines[:31]) + "\n")
    shutil.copy(source / "dev.tsv", root / "glue" / "RTE" / "dev.tsv")
    monkeypatch.setenv("COMPACTER_DATA_DIR", str(root))
    return root


def _config(data_dir):
    assert get_config().model == DEFAULT_MODEL == "t5-base"  # what `make run` trains
    assert get_config().fallback_model == "t5-mini-glue"
    return tiny_config(model=DEFAULT_MODEL, fallback_model="t5-mini-glue", source="files",
                       data_dir=str(data_dir), train_samples=-1, max_steps=1, eval_every=1,
                       save_every=1, max_eval_samples=4, eval_test=False, batch_size=4,
                       **{"peft.reduction_factor": 4})


def _run(config, workdir, capsys) -> tuple[int, str, list[str]]:
    with warnings.catch_warnings(record=True) as caught, fast_compiles():
        warnings.simplefilter("always")
        code = glue.run(config, str(workdir))
    return code, capsys.readouterr().err, [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def served_files():
    spiece = (checkpoints_dir() / "t5-mini-glue" / "spiece.model").read_bytes()
    return tiny_t5_files(spiece, d_model=16, d_kv=8)


def test_default_model_online_resolves_to_the_served_model(data_without_vocab, tmp_path,
                                                           monkeypatch, served_files):
    """The fast version of the next test: what the run loads, without training."""
    config = _config(data_without_vocab)
    with FakeHub({"google-t5/t5-base": served_files}) as fake:
        point_client_at(monkeypatch, fake.endpoint, tmp_path / "hf", offline=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback banner
            name, folder = backbone.resolve_model(config)
        tokenizer = backbone.load_tokenizer_for(config, name, folder)
        model, params = from_pretrained(str(folder))  # what load_model reads, hooks aside
    assert name == "t5-base" and folder.parent.parent.name == "models--google-t5--t5-base"
    assert tokenizer.name_or_path == str(folder)  # the served spiece.model
    assert (folder / "spiece.model").read_bytes() == served_files["spiece.model"]
    served = load_safetensors(served_files["model.safetensors"])
    np.testing.assert_array_equal(params["shared"]["embedding"], served["shared.weight"])
    assert model.config.d_model == 16


@pytest.mark.long
def test_default_model_online_is_the_served_model(data_without_vocab, tmp_path, monkeypatch,
                                                  capsys, served_files):
    with FakeHub({"google-t5/t5-base": served_files}) as fake:
        point_client_at(monkeypatch, fake.endpoint, tmp_path / "hf", offline=False)
        code, err, warned = _run(_config(data_without_vocab), tmp_path / "online", capsys)
        assert code == 0, err
    assert not any("FALLING BACK" in w for w in warned) and "FALLING BACK" not in err
    assert any(r.startswith("GET /google-t5/t5-base/resolve/") for r in fake.requests)
    summary = json.loads((tmp_path / "online" / "summary.json").read_text())
    assert summary["model"] == "t5-base"
    # The only tokenizer around is the served repo's: the data folder has no t5_vocab/.
    assert not (data_without_vocab / "t5_vocab").exists()


def test_default_model_offline_resolves_to_the_embedded_backbone_and_its_tokenizer(
        data_without_vocab, tmp_path, monkeypatch):
    """The fast version of the next test: what the run loads, without training."""
    point_client_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf", offline=True)
    config = _config(data_without_vocab)
    with pytest.warns(UserWarning, match=r"(?s)THE HUB CANNOT BE REACHED: .*'google-t5/t5-base'"
                                         r".*HF_HUB_OFFLINE=1.*FALLING BACK TO t5-mini-glue"):
        name, folder = backbone.resolve_model(config)
    assert (name, folder) == ("t5-mini-glue", checkpoints_dir() / "t5-mini-glue")
    tokenizer = backbone.load_tokenizer_for(config, name, folder)
    assert tokenizer.name_or_path == str(folder)
    for named in ("t5-large", "google-t5/t5-base"):  # a model the user names never falls back
        with pytest.raises(ModelNotCachedError):
            backbone.resolve_model(tiny_config(model=named, fallback_model="t5-mini-glue"))


@pytest.mark.long
def test_default_model_offline_falls_back_to_the_embedded_backbone(data_without_vocab, tmp_path,
                                                                    monkeypatch, capsys):
    point_client_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf", offline=True)
    code, err, warned = _run(_config(data_without_vocab), tmp_path / "offline", capsys)
    assert code == 0, err
    banner = [w for w in warned if "FALLING BACK TO t5-mini-glue" in w]
    assert banner and "THE HUB CANNOT BE REACHED" in banner[0] and "HF_HUB_OFFLINE=1" in banner[0]
    summary = json.loads((tmp_path / "offline" / "summary.json").read_text())
    assert summary["model"] == "t5-mini-glue"
