"""Models and tokenizers from the Hub, through the real huggingface_hub client talking to a fake
Hub on 127.0.0.1 (tests/hub_server.py): download into an empty HF_HOME, revision pinning, the
offline cache, and one-line errors naming the repo and the cause."""

from __future__ import annotations

import socket

import jax
import numpy as np
import pytest
from hub_server import COMMIT, FakeHub, point_client_at, tiny_t5_files
from safetensors.numpy import load as load_safetensors

from compacter_jax import hub
from compacter_jax.models import from_pretrained
from compacter_jax.models.hf_io import ModelNotCachedError, params_to_hf_state_dict
from compacter_jax.paths import checkpoints_dir
from compacter_jax.tokenizer import load_tokenizer

REPO = "someone/tiny-t5"


@pytest.fixture(scope="module")
def spiece() -> bytes:
    """The embedded backbone's own tokenizer file (shipped with the package)."""
    path = checkpoints_dir() / "t5-mini-glue" / "spiece.model"
    if not path.is_file():
        pytest.skip(f"no {path}")
    return path.read_bytes()


@pytest.fixture(scope="module")
def repo_files(spiece) -> dict[str, bytes]:
    return tiny_t5_files(spiece)


def _closed_port_endpoint() -> str:
    with socket.socket() as s:  # bound then closed: connecting is refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_download_into_an_empty_cache_then_load_offline(repo_files, tmp_path, monkeypatch):
    served = load_safetensors(repo_files["model.safetensors"])
    with FakeHub({REPO: repo_files}) as fake:
        point_client_at(monkeypatch, fake.endpoint, tmp_path / "hf", offline=False)
        model, params = from_pretrained(REPO)
        tokenizer = load_tokenizer(REPO, vocab_size=model.config.vocab_size)
        downloaded = {r.split("/resolve/")[1].split("/", 1)[1] for r in fake.requests
                      if r.startswith("GET /someone/tiny-t5/resolve/")}
        assert "GET /api/models/someone/tiny-t5/revision/main" in fake.requests
        assert any(r.startswith("GET /api/models/someone/tiny-t5/tree/") for r in fake.requests)
    assert {"config.json", "model.safetensors", "spiece.model"} <= downloaded
    loaded = params_to_hf_state_dict(params, model.config)
    assert set(loaded) == set(served)
    for key, value in served.items():
        np.testing.assert_array_equal(loaded[key], value)  # the served weights, bit for bit
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny-t5" / "snapshots" / COMMIT
    assert (snapshot / "spiece.model").read_bytes() == repo_files["spiece.model"]
    shipped = load_tokenizer(checkpoints_dir() / "t5-mini-glue")
    text = "sentence: the film is a delight."
    assert tokenizer(text).input_ids == shipped(text).input_ids

    # The server is gone: offline, the cache answers (by branch or by pinned commit).
    point_client_at(monkeypatch, _closed_port_endpoint(), tmp_path / "hf", offline=True)
    for revision in (None, COMMIT):
        again_model, again = from_pretrained(REPO, revision=revision)
        np.testing.assert_array_equal(again["shared"]["embedding"],
                                      params["shared"]["embedding"])
    assert len(load_tokenizer(REPO)) == len(tokenizer)
    with pytest.raises(ModelNotCachedError, match=r"'someone/other'.*HF_HUB_OFFLINE=1"):
        from_pretrained("someone/other")


def test_errors_name_the_repo_and_the_cause(repo_files, tmp_path, monkeypatch):
    with FakeHub({REPO: repo_files}, gated=("someone/gated",)) as fake:
        point_client_at(monkeypatch, fake.endpoint, tmp_path / "hf", offline=False)
        cases = [
            (dict(name_or_path="someone/missing"), hub.HubNotFoundError,
             r"'someone/missing'.*no such model repo"),
            (dict(name_or_path="someone/gated"), hub.HubAccessError, r"'someone/gated'.*gated"),
            (dict(name_or_path=REPO, revision="v9"), hub.HubNotFoundError,
             r"'someone/tiny-t5' \(revision v9\): revision 'v9' not found"),
            (dict(name_or_path=REPO, local_files_only=True), ModelNotCachedError,
             r"'someone/tiny-t5'.*local_files_only=True"),
        ]
        for kwargs, error, message in cases:
            with pytest.raises(error, match=message) as raised:
                from_pretrained(**kwargs)
            assert "\n" not in str(raised.value)
        with pytest.raises(hub.HubNotFoundError, match="'someone/tiny-t5'.* has no file "
                                                       "'tokenizer.json'"):
            hub.file(REPO, "tokenizer.json")
    assert not issubclass(hub.HubNotFoundError, ModelNotCachedError)  # never a fallback
    point_client_at(monkeypatch, _closed_port_endpoint(), tmp_path / "hf2", offline=False)
    with pytest.raises(ModelNotCachedError, match=r"'someone/tiny-t5'.*cannot be reached") as e:
        from_pretrained(REPO)
    assert "\n" not in str(e.value)


def test_load_config_fetches_config_json_only(repo_files, tmp_path, monkeypatch):
    from compacter_jax.models.hf_io import load_config

    with FakeHub({REPO: repo_files}) as fake:
        point_client_at(monkeypatch, fake.endpoint, tmp_path / "hf", offline=False)
        assert load_config(REPO).d_model == 8
        fetched = {r.rsplit("/", 1)[-1] for r in fake.requests if "/resolve/" in r}
        assert fetched == {"config.json"}
        assert load_config(REPO, check_weights=True).d_model == 8  # now the weights too
        assert "model.safetensors" in {r.rsplit("/", 1)[-1] for r in fake.requests}


def test_load_adapter_fetches_its_backbone_then_works_offline(repo_files, tmp_path, monkeypatch):
    import compacter_jax as cj

    with FakeHub({REPO: repo_files}) as fake:
        point_client_at(monkeypatch, fake.endpoint, tmp_path / "hf", offline=False)
        model, params = cj.from_pretrained(REPO, "bitfit")
        method = cj.get_method("bitfit")
        trainable, _ = method.partition(params)
        trainable = jax.tree_util.tree_map(lambda x: x + 0.5, trainable)  # "trained"
        cj.save_adapter(tmp_path / "adapter", trainable, method, model=REPO)
    point_client_at(monkeypatch, _closed_port_endpoint(), tmp_path / "hf", offline=True)
    _, loaded = cj.load_adapter(tmp_path / "adapter")  # the backbone the export records
    got, frozen = method.partition(loaded)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(trainable)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(frozen["shared"]["embedding"], params["shared"]["embedding"])
