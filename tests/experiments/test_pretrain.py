"""Span-corruption pretraining (experiments.pretrain) with a tiny T5 on two small real tasks,
and the shipped checkpoint `checkpoints/t5-mini-glue`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from compacter_jax.data import make_source
from compacter_jax.data.corpus import chunk_documents, chunks_fingerprint, corpus_documents
from compacter_jax.data.span_corruption import SpanCorruption, eval_batches
from compacter_jax.host import param_count
from compacter_jax.models import from_pretrained
from experiments import pretrain
from experiments.configs.pretrain import get_config

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "t5-mini-glue"


def tiny_config(**overrides):
    c = get_config("tiny")
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def events(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(shared_data, t5_vocab, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    return workdir, pretrain.train_and_evaluate(tiny_config(), workdir)


def test_a_few_steps_lower_the_loss(finished):
    workdir, summary = finished
    train = [e["train/loss"] for e in events(workdir) if "train/loss" in e]
    heldout = [e["heldout/loss"] for e in events(workdir) if "heldout/loss" in e]
    assert len(train) == 6 and len(heldout) == 2  # log every 2 of 12 steps; eval at 6, 12
    assert train[-1] < train[0] - 1.0, train  # from ~ln(32128) = 10.4
    assert heldout[1] < heldout[0] < 10.0, heldout
    assert summary["finished"] and summary["steps"] == 12
    assert summary["heldout_loss"] == pytest.approx(heldout[-1])
    diag = summary["heldout_diagnostics"]
    assert diag["loss"] == pytest.approx(summary["heldout_loss"], abs=1e-5)
    # 34 raw tokens -> 5 noise tokens in 2 spans -> targets: 2 sentinels, 5 content, EOS.
    assert diag["content_fraction"] == pytest.approx(5 / 8)
    assert diag["content_fraction"] * diag["content_loss"] + (
        1 - diag["content_fraction"]) * diag["format_loss"] == pytest.approx(diag["loss"])
    assert np.isfinite(diag["mismatched_inputs_loss"])
    assert summary["corpus"]["tasks"] == ["cb", "copa"]
    assert (workdir / "checkpoints" / "steps" / "12").is_dir()
    assert list((workdir / "tensorboard").iterdir())
    config = json.loads((workdir / "hf" / "config.json").read_text())
    assert config["d_model"] == 64 and config["dropout_rate"] == 0.1


def test_interrupted_and_resumed_run_equals_uninterrupted(finished, tmp_path):
    workdir, _ = finished
    partial = pretrain.train_and_evaluate(tiny_config(stop_after=5), tmp_path)
    assert partial == {"steps": 5, "finished": False}
    assert (tmp_path / "checkpoints" / "steps" / "5").is_dir()
    assert not (tmp_path / "hf").exists()
    resumed = pretrain.train_and_evaluate(tiny_config(), tmp_path)
    want = load_file(workdir / "hf" / "model.safetensors")
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert resumed["heldout_loss"] == finished[1]["heldout_loss"]
    # The same losses were logged for the steps after the resume.
    tail = lambda d: [(e["step"], e["train/loss"]) for e in events(d)  # noqa: E731
                      if "train/loss" in e and e["step"] > 6]
    assert tail(tmp_path) == tail(workdir)


def test_checkpoint_loads_in_hf_pytorch_t5_with_equal_logits(finished):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    workdir, _ = finished
    hf = transformers.T5ForConditionalGeneration.from_pretrained(workdir / "hf").eval()
    model, params = from_pretrained(str(workdir / "hf"))
    spec = SpanCorruption(inputs_length=32)
    chunks = np.random.default_rng(0).integers(2, 32000, (3, spec.tokens_length))
    batch = next(eval_batches(chunks, 3, spec, seed=0))
    batch["attention_mask"][2, 20:] = 0  # some padding too
    ours = np.asarray(model.apply({"params": params}, batch["input_ids"],
                                  batch["attention_mask"], batch["decoder_input_ids"],
                                  batch["decoder_attention_mask"], deterministic=True))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                 decoder_input_ids=torch.tensor(batch["decoder_input_ids"], dtype=torch.long),
                 decoder_attention_mask=torch.tensor(batch["decoder_attention_mask"],
                                                     dtype=torch.long)).logits.numpy()
    assert ours.shape == ref.shape == (3, spec.targets_length, 32128)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def _readme_record(readme: Path) -> dict:
    blocks = re.findall(r"```json\n(.*?)\n```", readme.read_text(), flags=re.S)
    assert blocks, f"{readme} has no ```json record block"
    return json.loads(blocks[0])


def _shipped_record() -> dict:
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"no shipped checkpoint at {SHIPPED}")
    return _readme_record(SHIPPED / "README.md")


def test_shipped_checkpoint_is_complete_and_matches_its_record():
    from compacter_jax.tokenizer import load_tokenizer

    record = _shipped_record()
    size = sum(f.stat().st_size for f in SHIPPED.iterdir())
    # The checkpoint carries the tokenizer it was trained with (the model's own, issue 17):
    # trained on the corpus (pretrain.py:mix), its size is the model's vocabulary exactly.
    assert size < 64 * 2**20 and (SHIPPED / "spiece.model").is_file()
    vocab_size = json.loads((SHIPPED / "config.json").read_text())["vocab_size"]
    assert len(load_tokenizer(str(SHIPPED))) == record["tokenizer_size"] == vocab_size
    model, params = from_pretrained(str(SHIPPED))
    assert param_count(params) == record["parameters"]
    assert model.config.d_model == record["config"]["model"]["d_model"]


@pytest.mark.long  # rebuilds the whole decontaminated corpus (GLUE text + text/*.zip): ~1 min
def test_shipped_checkpoint_heldout_loss_recomputes(shared_data):
    from compacter_jax.tokenizer import load_tokenizer

    record = _shipped_record()
    config = get_config()
    config.update_from_flattened_dict({k: v for k, v in _flatten(record["config"]).items()
                                       if k in _flatten(config.to_dict())})
    config.data_dir = str(shared_data)
    model, params = from_pretrained(str(SHIPPED))
    # Rebuild the held-out text the README names, in the shipped tokenizer, and check it is
    # that very text.
    tokenizer = load_tokenizer(str(SHIPPED))
    docs = pretrain.build_documents(config)
    assert list(docs.tasks) == record["corpus"]["tasks"]
    spec = pretrain.span_corruption_spec(config, tokenizer)
    assert spec.inputs_length == record["span_corruption"]["inputs_length"]
    chunks = chunk_documents(docs.heldout_texts, tokenizer, spec.tokens_length)
    assert chunks_fingerprint(chunks) == record["corpus"]["heldout_sha256"], (
        "the held-out text changed (data files or paper splits differ from the run's)")
    loss = pretrain.heldout_loss(pretrain.make_heldout_loss(model), params, eval_batches(
        chunks, record["eval_batch_size"], spec, seed=record["heldout_corruption_seed"]))
    assert loss["tokens"] == record["heldout_tokens"]
    # The same float32 arithmetic, recompiled for this CPU (AVX2 and AVX-512 order sums
    # differently): each token's loss moves by a few eps32 * sqrt(d_ff) of its size, and so
    # does their mean.
    bound = 4 * np.finfo(np.float32).eps * np.sqrt(record["config"]["model"]["d_ff"])
    assert loss["loss"] == pytest.approx(record["heldout_loss"], rel=bound)
    # Issue 18's first target: the decoder reads its encoder (pairing each held-out target with
    # another chunk's inputs costs >= 0.5 nats), as the record says.
    diagnostics = pretrain.heldout_diagnostics(
        pretrain.make_token_losses(model), params,
        eval_batches(chunks, record["eval_batch_size"], spec,
                     seed=record["heldout_corruption_seed"]), spec)
    recorded = record["heldout_diagnostics"]
    for key in ("loss", "mismatched_inputs_loss"):
        assert diagnostics[key] == pytest.approx(recorded[key], rel=bound)
    assert diagnostics["mismatched_inputs_loss"] - diagnostics["loss"] >= 0.5


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested record as ConfigDict's flattened keys."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.long  # ~15 s idle (a tokenizer, the corpus, two compiled shapes); the pieces
# run by default: tests/data/test_denoising.py, tests/data/test_text_corpus.py,
# tests/experiments/test_train_tokenizer.py and the model-vocabulary check below.
def test_mix_recipe_trains_its_own_vocabulary_and_ships_it(shared_data, tmp_path):
    # pretrain.py:mix in miniature: text corpora, a trained SentencePiece vocabulary sized
    # into the model, every second batch denoising, diagnostics and snapshots.
    config = tiny_config(text_sources="inaugural", tokenizer="train", tokenizer_vocab_size=1000,
                         vocab_size=0, denoise_fraction=0.5, num_train_steps=4,
                         eval_every=2, save_every=2, log_every=2, eval_diagnostics=True,
                         export_snapshots=True)
    summary = pretrain.train_and_evaluate(config, tmp_path)
    assert summary["vocab_size"] == summary["tokenizer_size"] == 1000 + 100
    assert summary["corpus"]["per_task"]["text:inaugural"]["documents"] > 1000
    for directory in (tmp_path / "hf", tmp_path / "snapshots" / "step_2"):
        assert (directory / "spiece.model").read_bytes() == (
            tmp_path / "tokenizer" / "spiece.model").read_bytes()
        assert json.loads((directory / "config.json").read_text())["vocab_size"] == 1100
    logged = [e for e in events(tmp_path) if "heldout/loss" in e]
    assert [e["step"] for e in logged] == [2, 4]
    for e in logged:
        assert np.isfinite(e["heldout/denoise_loss"]) and np.isfinite(e["heldout/encoder_gain"])
        assert e["heldout/encoder_gain"] == pytest.approx(
            e["heldout/mismatched_inputs_loss"] - e["heldout/loss"], abs=1e-4)


def test_model_vocabulary_must_hold_the_tokenizer():
    config = tiny_config()
    assert pretrain.model_config(config, 32100).vocab_size == 32128
    config.vocab_size = 0
    assert pretrain.model_config(config, 8100).vocab_size == 8100
    config.vocab_size = 8000
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain.model_config(config, 8100)


def test_adafactor_first_update_is_the_sign_scaled_by_the_parameter_rms():
    # T5's optimiser, written out for the first update of small (unfactored) tensors: the
    # second moment is g^2 (decay 1 - 1^-0.8 = 0), so g / sqrt(v) = sign(g) (RMS 1, no
    # clipping), times the rate and each tensor's RMS.
    import jax.numpy as jnp

    tx, schedule = pretrain.pretraining_optimizer("adafactor", 1e-2, 0, 100, 0.0, 0.0)
    rng = np.random.default_rng(0)
    params = {"small": rng.normal(0, 0.01, (4, 3)), "large": rng.normal(0, 1.0, (5,))}
    grads = {k: rng.normal(0, 1e-3, v.shape) for k, v in params.items()}
    params32 = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    updates, _ = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()},
                           tx.init(params32), params32)
    assert float(schedule(0)) == pytest.approx(1e-2)
    for k in params:
        rms = np.sqrt(np.mean(params[k] ** 2))
        np.testing.assert_allclose(np.asarray(updates[k]), -1e-2 * rms * np.sign(grads[k]),
                                   rtol=1e-5)
    with pytest.raises(ValueError, match="optimizer"):
        pretrain.pretraining_optimizer("sgd", 1e-2, 0, 100, 0.0, 0.0)


# ------------------------------------------------------------- the run scaffold (issue 19)

class Killed(Exception):
    pass


def test_a_busy_workdir_is_refused_before_the_corpus(tmp_path, monkeypatch):
    from experiments.workdir import WorkdirError, WorkdirLock

    monkeypatch.setattr(pretrain, "build_documents", lambda config: pytest.fail("corpus built"))
    lock = WorkdirLock(tmp_path).acquire()
    try:
        with pytest.raises(WorkdirError, match="in use by another run"):
            pretrain.train_and_evaluate(tiny_config(), tmp_path)
    finally:
        lock.release()


def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
        finished, tmp_path, monkeypatch):
    """Killed while drawing step 7 (checkpoints every 4 steps: the last is step 4), resumed:
    the parameters and the logged losses are the uninterrupted run's (the same float32
    operations in the same order: equal within a few ulps), and the summary is written once,
    atomically. (Pretraining is one process: no multi-host kill test here.)"""
    from experiments import reporting

    straight_dir, straight = finished
    real = pretrain.mixture_batches

    def dies_at_step_7(*args, **kwargs):
        for step, item in enumerate(real(*args, **kwargs), 1):
            if step == 7:
                raise Killed
            yield item

    monkeypatch.setattr(pretrain, "mixture_batches", dies_at_step_7)
    with pytest.raises(Killed):
        pretrain.train_and_evaluate(tiny_config(), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "steps").iterdir()) == ["4"]
    assert not (tmp_path / "summary.json").exists()
    monkeypatch.setattr(pretrain, "mixture_batches", real)
    writes = []
    atomic_write = reporting.atomic_write
    monkeypatch.setattr(reporting, "atomic_write",
                        lambda path, text: writes.append(path) or atomic_write(path, text))
    resumed = pretrain.train_and_evaluate(tiny_config(), tmp_path)
    # The metrics log cut back to step 4 on resume, the summary at the end: each atomically.
    assert writes == [tmp_path / "metrics.jsonl", tmp_path / "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["heldout_loss"] == (
        resumed["heldout_loss"])
    want = load_file(straight_dir / "hf" / "model.safetensors")
    got = load_file(tmp_path / "hf" / "model.safetensors")
    eps = float(np.finfo(np.float32).eps)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=8 * eps,
                                   atol=8 * eps * float(np.abs(want[key]).max()), err_msg=key)
    losses = lambda d: [(e["step"], e["train/loss"]) for e in events(d)  # noqa: E731
                        if "train/loss" in e]
    assert [s for s, _ in losses(tmp_path)] == [2, 4, 6, 8, 10, 12]  # 6 dropped, recomputed
    np.testing.assert_allclose([v for _, v in losses(tmp_path)],
                               [v for _, v in losses(straight_dir)], rtol=8 * eps)
    assert resumed["heldout_loss"] == pytest.approx(straight["heldout_loss"], rel=8 * eps)
