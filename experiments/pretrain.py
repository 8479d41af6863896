r"""Pretrain a small T5 with span corruption on the text of the local training splits.

  python -m experiments.pretrain --config experiments/configs/pretrain.py --workdir runs/pretrain
  python -m experiments.pretrain --config experiments/configs/pretrain.py:mix --workdir DIR

`:mix` (issue 18) adds the unlabelled text corpora (`config.text_sources`), trains its own
SentencePiece vocabulary on the corpus (`config.tokenizer="train"`, written to
`<workdir>/tokenizer/` and shipped as `spiece.model` with every export; the model's
vocabulary is the tokenizer's size), and makes every second batch a full-sequence denoising
batch (`compacter_jax.data.denoising`; `config.denoise_fraction`). With
`config.eval_diagnostics` each evaluation also logs the encoder-swap diagnostic
(`heldout_diagnostics`), and `config.export_snapshots` exports each evaluated step to
`<workdir>/snapshots/step_<N>` for fine-tuning checks while the run goes on.

The reading path (flax examples/wmt style): corpus of the paper's train splits -> T5 from
`config.model` -> AdamW with warm-up -> jit train step over all parameters -> resumable loop
with held-out loss, metrics.jsonl, TensorBoard and orbax checkpoints -> HF checkpoint
(`<workdir>/hf`: config.json + model.safetensors, loadable by `compacter_jax.models.
from_pretrained` and transformers' `T5ForConditionalGeneration.from_pretrained`) and
`<workdir>/summary.json`. Re-running with the same --workdir resumes from the latest checkpoint
(state and data position) and gives the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from compacter_jax.data import DataState, make_source
from compacter_jax.data.corpus import (PretrainingCorpus, corpus_documents, pretraining_corpus,
                                       text_documents)
from compacter_jax.data.denoising import denoise_eval_batches, mixture_batches
from compacter_jax.data.span_corruption import (NUM_SENTINELS, SpanCorruption, eval_batches,
                                                 first_sentinel_id)
from compacter_jax.atomic import atomic_write
from compacter_jax.host import param_count
from compacter_jax.models import T5Config, T5ForConditionalGeneration, init_params, save_pretrained
from compacter_jax.tokenizer import load_tokenizer
from compacter_jax.train import (Checkpointer, MetricsBuffer, TrainState, due, make_optimizer,
                                 make_schedule, make_strategy, make_train_step, mean_metrics,
                                 seq2seq_apply_fn)
from experiments import cli, multihost
from experiments import run as run_lib
from experiments import spec as spec_lib
from experiments.train_tokenizer import SPIECE, parse_text_sources, train_sentencepiece

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def span_corruption_spec(config: ml_collections.ConfigDict, tokenizer) -> SpanCorruption:
    """The span-corruption settings, with `<extra_id_0>` and EOS read from the tokenizer."""
    return SpanCorruption(inputs_length=config.inputs_length,
                          noise_density=config.noise_density,
                          mean_noise_span_length=config.mean_noise_span_length,
                          first_sentinel_id=first_sentinel_id(tokenizer),
                          eos_id=int(tokenizer.eos_token_id))


def build_documents(config: ml_collections.ConfigDict):
    """The decontaminated documents: the tasks' training text plus `config.text_sources`."""
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()] or None
    source = make_source(config.source, data_dir=config.data_dir or None)
    names = parse_text_sources(config.text_sources)
    texts = None
    if names:
        from compacter_jax.paths import data_dir
        texts = text_documents(config.data_dir or data_dir(), names)
    return corpus_documents(source, tasks, data_seed=config.data_seed,
                            heldout_fraction=config.heldout_fraction, texts=texts)


def build_tokenizer(config: ml_collections.ConfigDict, workdir: Path, documents):
    """`config.tokenizer`: "" = the shared T5 vocabulary, a directory holding spiece.model, or
    "train": a `config.tokenizer_vocab_size`-piece SentencePiece model trained on the corpus'
    training documents, written once to `<workdir>/tokenizer/` (a resumed run reuses it)."""
    if config.tokenizer != "train":
        return load_tokenizer(config.tokenizer or None)
    out = workdir / "tokenizer"
    if not (out / SPIECE).is_file():
        log.info("training a %d-piece SentencePiece model on %d documents",
                 config.tokenizer_vocab_size, len(documents.train_texts))
        train_sentencepiece(documents.train_texts, out,
                            vocab_size=config.tokenizer_vocab_size)
    return load_tokenizer(out)


def build_corpus(config: ml_collections.ConfigDict, tokenizer,
                 spec: SpanCorruption, documents=None) -> PretrainingCorpus:
    documents = build_documents(config) if documents is None else documents
    return pretraining_corpus(tokenizer=tokenizer, chunk_length=spec.tokens_length,
                              documents=documents)


# ---------------------------------------------------------------------------- model


def model_config(config: ml_collections.ConfigDict, tokenizer_size: int | None = None
                 ) -> T5Config:
    """The T5Config of `config.model` (runtime options: float32, `config.scan_layers`).

    Its vocabulary is `config.vocab_size`, or, when that is 0, the tokenizer's size
    (`len(tokenizer)`, sentinels included), which must then be given."""
    vocab_size = int(config.get("vocab_size", 32128))
    if vocab_size <= 0:
        if tokenizer_size is None:
            raise ValueError("config.vocab_size=0 (the tokenizer's size) needs tokenizer_size")
        vocab_size = int(tokenizer_size)
    if tokenizer_size is not None and tokenizer_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer_size} entries > the model's vocab_size "
                         f"{vocab_size}: set --config.vocab_size=0 (the tokenizer's size)")
    return T5Config(vocab_size=vocab_size, scan_layers=config.scan_layers, **config.model)


def make_heldout_loss(model: T5ForConditionalGeneration):
    """Jitted `(params, batch) -> (loss_sum, tokens)` over the batch's real rows
    (`example_mask`), deterministic (no dropout); float32."""
    apply_fn = seq2seq_apply_fn(model)

    @jax.jit
    def sums(params, batch):
        logits = apply_fn(params, batch, True, None)
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch["labels"])
        mask = (batch["decoder_attention_mask"] * batch["example_mask"][:, None]
                ).astype(jnp.float32)
        return jnp.sum(losses * mask), jnp.sum(mask)

    return sums


def heldout_loss(sums_fn, params: Any, batches: Iterable[dict]) -> dict[str, float]:
    """Mean token cross-entropy over all held-out batches: {"loss", "tokens"}."""
    total = count = 0.0
    for batch in batches:
        s, n = sums_fn(params, batch)
        total, count = total + float(s), count + float(n)
    return {"loss": total / max(count, 1.0), "tokens": count}


def make_token_losses(model: T5ForConditionalGeneration):
    """Jitted `(params, batch) -> float32 [B, T]` token cross-entropies (deterministic)."""
    apply_fn = seq2seq_apply_fn(model)
    return jax.jit(lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
        apply_fn(p, b, True, None).astype(jnp.float32), b["labels"]))


def heldout_diagnostics(token_losses, params: Any, batches: Iterable[dict],
                        spec: SpanCorruption) -> dict[str, float]:
    """Where the held-out loss comes from (`token_losses = make_token_losses(model)`; means of
    token cross-entropy, nats):

      format_loss: at the sentinels and the closing EOS of the targets (their layout);
      content_loss: at the other positions (the masked-out tokens themselves);
      content_fraction: share of target tokens that are content;
      mismatched_inputs_loss: the loss when every target is paired with the inputs of the next
        chunk of its batch; equal to the loss when the decoder ignores the encoder.
    """
    first, last = spec.first_sentinel_id, spec.first_sentinel_id - NUM_SENTINELS + 1
    own, other, is_format = [], [], []
    for batch in batches:
        # Whole (padded) batches keep one compiled shape; padding rows are masked out below.
        rolled = dict(batch, input_ids=np.roll(batch["input_ids"], 1, axis=0),
                      attention_mask=np.roll(batch["attention_mask"], 1, axis=0))
        keep = (batch["decoder_attention_mask"] == 1) & (batch["example_mask"][:, None] == 1)
        labels = batch["labels"]
        own.append(np.asarray(token_losses(params, batch))[keep])
        other.append(np.asarray(token_losses(params, rolled))[keep])
        final = np.arange(labels.shape[1]) == batch["decoder_attention_mask"].sum(
            axis=1, keepdims=True) - 1
        # The closing EOS is format; an EOS inside a span (a document boundary) is content.
        is_format.append((((labels >= last) & (labels <= first)) | final)[keep])
    own, other, is_format = map(np.concatenate, (own, other, is_format))
    return {"loss": float(own.mean()), "format_loss": float(own[is_format].mean()),
            "content_loss": float(own[~is_format].mean()),
            "content_fraction": float((~is_format).mean()),
            "mismatched_inputs_loss": float(other.mean())}


@functools.lru_cache(maxsize=2)
def initial_params(t5_config: T5Config, seed: int) -> dict:
    """`init_params` of the T5 with PRNGKey(seed). Cached per process: compiling the
    initialiser takes seconds, and reruns in one process (tests, a notebook) reuse it; the
    arrays are never donated (the loop trains on device copies)."""
    return init_params(T5ForConditionalGeneration(t5_config), jax.random.PRNGKey(seed))


@dataclasses.dataclass(frozen=True)
class Steps:
    """The optimizer and the compiled steps of one (model, schedule) setting."""

    model: T5ForConditionalGeneration
    tx: optax.GradientTransformation
    strategy: Any
    train_step: Any    # compiled (state, frozen, batch) -> (state, metrics); state donated
    heldout_sums: Any  # jitted (params, batch) -> (loss_sum, tokens)
    token_losses: Any  # jitted (params, batch) -> [B, T] token losses


def pretraining_optimizer(name: str, learning_rate: float, warmup_steps: int,
                          total_steps: int, weight_decay: float, clip_norm: float
                          ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`, the schedule a linear warm-up then linear decay to 0.

    name: "adamw": `compacter_jax.train.make_optimizer` (global-norm clipping, decoupled
      weight decay). "adafactor": T5's own optimiser (`optax.adafactor`: factored second
      moments, no momentum, updates clipped to RMS 1 per tensor and scaled by each
      parameter's RMS, so one rate suits T5's very differently scaled initial weights, e.g.
      embeddings std 1 and query kernels std (d_model * d_kv)^-0.5); T5 pretrained with
      rate 0.01. Global-norm clipping before it when `clip_norm > 0`; no weight decay.
    """
    clip = clip_norm if clip_norm > 0 else None
    if name == "adamw":
        return make_optimizer(learning_rate, warmup_steps, total_steps,
                              weight_decay=weight_decay, clip_norm=clip)
    if name == "adafactor":
        schedule = make_schedule(learning_rate, warmup_steps, total_steps)
        tx = optax.adafactor(schedule, multiply_by_parameter_scale=True,
                             clipping_threshold=1.0)
        return (tx if clip is None else optax.chain(optax.clip_by_global_norm(clip), tx),
                schedule)
    raise ValueError(f"unknown --config.optimizer={name!r}: use adamw or adafactor")


@functools.lru_cache(maxsize=2)
def compiled_steps(t5_config: T5Config, learning_rate: float, warmup_steps: int,
                   total_steps: int, weight_decay: float, clip_norm: float,
                   optimizer: str = "adamw") -> Steps:
    """The optimizer (`pretraining_optimizer`) and the jit train step over all parameters
    (the frozen tree is empty). Cached per process like `initial_params`, so a rerun in the
    same process compiles nothing."""
    model = T5ForConditionalGeneration(t5_config)
    tx, schedule = pretraining_optimizer(optimizer, learning_rate, warmup_steps, total_steps,
                                         weight_decay, clip_norm)
    train_step = make_train_step(seq2seq_apply_fn(model), tx,
                                 merge_fn=lambda trainable, frozen: trainable,
                                 schedule=schedule, per_example_dropout=False)
    strategy = make_strategy("jit")
    return Steps(model, tx, strategy, strategy.compile_train_step(train_step),
                 make_heldout_loss(model), make_token_losses(model))


# ------------------------------------------------------------------------------ main


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Runs (or resumes) one pretraining job in `workdir`; returns the summary dict (also
    written to `<workdir>/summary.json` once training has finished).

    Before the corpus is built or anything compiled: the config is checked (`ConfigError`
    naming the field and the fix), the workdir is checked writable and locked, and a resume
    must match the config it resumes (`WorkdirError`)."""
    spec = spec_lib.pretrain_spec(config)
    workdir = Path(workdir).expanduser().absolute()
    with run_lib.claim_workdir(config, workdir):
        return _pretrain(config, spec, workdir)


@dataclasses.dataclass
class Pretraining:
    """What the pretraining loop uses, built by `build` before the first step."""

    tokenizer: Any
    spec: SpanCorruption
    corpus: PretrainingCorpus
    t5_config: T5Config
    steps: Steps
    state: TrainState
    n_params: int

    def heldout_batches(self, config, denoise: bool = False):
        """The held-out chunks, corrupted once with `heldout_corruption_seed`."""
        make = denoise_eval_batches if denoise else eval_batches
        return make(self.corpus.heldout_chunks, config.eval_batch_size, self.spec,
                    seed=config.heldout_corruption_seed)


def build(config: ml_collections.ConfigDict, workdir: Path) -> Pretraining:
    """Data (chunks of the training text, corrupted afresh each epoch), the model, the
    optimizer and the compiled step. Full pretraining trains every parameter."""
    total_steps = int(config.num_train_steps)
    documents = build_documents(config)
    tokenizer = build_tokenizer(config, workdir, documents)
    spec = span_corruption_spec(config, tokenizer)
    corpus = build_corpus(config, tokenizer, spec, documents)
    if corpus.train_chunks.shape[0] < config.batch_size:
        raise ValueError(f"--config.batch_size={config.batch_size} exceeds the "
                         f"{corpus.train_chunks.shape[0]} training chunks")
    log.info("corpus: %s", {k: v for k, v in corpus.summary().items() if k != "per_task"})
    t5_config = model_config(config, len(tokenizer))
    params = initial_params(t5_config, config.seed)
    n_params = param_count(params)
    log.info("model: %s parameters (%s)", f"{n_params:,}", dict(config.model))
    steps = compiled_steps(t5_config, config.learning_rate,
                           min(config.warmup_steps, total_steps - 1), total_steps,
                           config.weight_decay, config.clip_norm,
                           config.optimizer)
    state = TrainState.create(params, steps.tx,
                              jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
    return Pretraining(tokenizer, spec, corpus, t5_config, steps, state, n_params)


def export(config, workdir: Path, run: Pretraining, directory: Path, host_params) -> None:
    """HF layout + the tokenizer's spiece.model when it is not the shared T5 vocabulary."""
    save_pretrained(directory, run.t5_config.replace(dropout_rate=config.export_dropout_rate,
                                                     scan_layers=False), host_params)
    if config.tokenizer:
        spm = (workdir / "tokenizer" if config.tokenizer == "train"
               else Path(config.tokenizer)) / SPIECE
        atomic_write(directory / SPIECE, spm.read_bytes())  # never a torn tokenizer


def evaluate(config, run: Pretraining, params) -> tuple[dict[str, float], dict[str, float]]:
    """(the metrics record of one evaluation, `heldout_loss`'s {"loss", "tokens"}): the
    held-out loss, and the diagnostics / denoising loss when the config asks for them."""
    sums_fn = run.steps.heldout_sums
    heldout = heldout_loss(sums_fn, params, run.heldout_batches(config))
    record = {"heldout/loss": heldout["loss"]}
    if config.eval_diagnostics:
        diag = heldout_diagnostics(run.steps.token_losses, params, run.heldout_batches(config),
                                   run.spec)
        record.update({f"heldout/{k}": v for k, v in diag.items() if k != "loss"})
        record["heldout/encoder_gain"] = diag["mismatched_inputs_loss"] - diag["loss"]
    if config.denoise_fraction > 0:
        record["heldout/denoise_loss"] = heldout_loss(
            sums_fn, params, run.heldout_batches(config, denoise=True))["loss"]
    return record, heldout


def _pretrain(config: ml_collections.ConfigDict, spec: spec_lib.PretrainSpec,
              workdir: Path) -> dict:
    """The run itself, top-down, in a claimed workdir."""
    total_steps = spec.total_steps
    run = build(config, workdir)
    strategy, compiled = run.steps.strategy, run.steps.train_step
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                        best_mode="min")
    state, meta = run_lib.restore(ckpt, run.state, config)
    position = DataState.from_dict(meta["data_position"]) if meta else DataState()
    elapsed = float(meta.get("train_seconds", 0.0)) if meta else 0.0
    step = int(np.asarray(state.step))
    frozen, dev_state = strategy.put_frozen({}), strategy.replicate(state)
    writers = run_lib.open_writers(workdir, step, total_steps, config.batch_size)
    stop_at = min(total_steps, step + (spec.stop_at_most or total_steps))
    batches = mixture_batches(run.corpus.train_chunks, config.batch_size, run.spec,
                              seed=config.seed, denoise_fraction=config.denoise_fraction,
                              state=position)
    buffer, window, last_heldout = MetricsBuffer(strategy), [], None
    started = time.perf_counter()

    with ckpt:
        while step < stop_at:
            batch, position = next(batches)
            dev_state, metrics = compiled(dev_state, frozen, strategy.shard_batch(batch))
            step += 1
            buffer.add(step, metrics)
            last = step == total_steps
            do_log = due(step, config.log_every, total_steps)
            do_eval = due(step, config.eval_every, total_steps)
            do_save = due(step, config.save_every, total_steps) or step == stop_at
            if not (do_log or do_eval or do_save):
                continue
            window += run_lib.flush(buffer, ckpt)  # one host sync; NaN/inf raise
            if do_log:
                writers.progress.update(step, window)
                writers.metrics.write(step, {f"train/{k}": v
                                             for k, v in mean_metrics(window).items()})
                window = []
            if do_eval:
                start = time.perf_counter()
                record, last_heldout = evaluate(config, run, dev_state.params)
                writers.metrics.write(step, record)
                writers.progress.note(f"step {step}: " + ", ".join(
                    f"{k.split('/')[1]} {v:.4f}" for k, v in record.items())
                    + f" ({time.perf_counter() - start:.1f}s)")
                if config.export_snapshots and not last:
                    export(config, workdir, run, workdir / "snapshots" / f"step_{step}",
                           strategy.unreplicate(dev_state.params))
            if do_save:
                ckpt.save(step, strategy.unreplicate(dev_state),
                          {"data_position": position.to_dict(), "config": config.to_dict(),
                           "train_seconds": elapsed + time.perf_counter() - started})
        writers.progress.close()
        ckpt.wait()
    train_seconds = elapsed + time.perf_counter() - started
    if step < total_steps:  # stopped on purpose (stop_after): the next run resumes
        writers.close()
        log.info("stopped at step %d of %d; rerun with the same --workdir to resume", step,
                 total_steps)
        return {"steps": step, "finished": False}
    return _finish(config, spec, workdir, run, strategy.unreplicate(dev_state.params),
                   last_heldout, train_seconds, writers)


def _finish(config, spec: spec_lib.PretrainSpec, workdir: Path, run: Pretraining, host_params,
            heldout: dict | None, train_seconds: float, writers: run_lib.Writers) -> dict:
    """The HF export, the held-out diagnostics and the run's summary (`heldout`: the last
    evaluation's `heldout_loss`, None when this process evaluated nothing)."""
    if heldout is None:  # resumed exactly at the end
        heldout = heldout_loss(run.steps.heldout_sums, host_params, run.heldout_batches(config))
    export_dir = Path(spec.export_dir) if spec.export_dir else workdir / "hf"
    if multihost.is_primary():
        export(config, workdir, run, export_dir, host_params)
    diagnostics = heldout_diagnostics(run.steps.token_losses, host_params,
                                      run.heldout_batches(config), run.spec)
    history = writers.metrics.read()
    train_losses = [h["train/loss"] for h in history if "train/loss" in h]
    corruption = run.spec
    summary = {
        "steps": spec.total_steps, "finished": True,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_train_loss_window": config.log_every,
        "heldout_loss": heldout["loss"], "heldout_tokens": heldout["tokens"],
        "heldout_diagnostics": diagnostics,
        "heldout_corruption_seed": config.heldout_corruption_seed,
        "eval_batch_size": config.eval_batch_size,
        "parameters": run.n_params, "export_dir": str(export_dir),
        "tokens_per_step": config.batch_size * (corruption.inputs_length
                                                + corruption.targets_length),
        "vocab_size": run.t5_config.vocab_size, "tokenizer_size": len(run.tokenizer),
        "span_corruption": {"inputs_length": corruption.inputs_length,
                            "targets_length": corruption.targets_length,
                            "tokens_length": corruption.tokens_length,
                            "noise_density": corruption.noise_density,
                            "mean_noise_span_length": corruption.mean_noise_span_length},
        "corpus": run.corpus.summary(), "config": config.to_dict(),
    }
    run_lib.write_summary(workdir, summary)
    writers.close()
    log.info("done: %d steps in %.0fs, train loss %.4f, held-out loss %.4f -> %s",
             summary["steps"], train_seconds, summary["final_train_loss"] or float("nan"),
             summary["heldout_loss"], export_dir)
    return summary


if __name__ == "__main__":
    cli.main(train_and_evaluate, "experiments/configs/pretrain.py", check=spec_lib.pretrain_spec,
             workdir_help="Directory for checkpoints, metrics and the HF export.",
             config_help="Pretraining config file (ml_collections).")
