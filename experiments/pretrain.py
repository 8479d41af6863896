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
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from compacter_jax.data import DataState, make_source
from compacter_jax.data.corpus import (PretrainingCorpus, corpus_documents, pretraining_corpus,
                                       text_documents)
from compacter_jax.data.denoising import denoise_eval_batches, mixture_batches
from compacter_jax.data.span_corruption import (NUM_SENTINELS, SpanCorruption, eval_batches,
                                                 first_sentinel_id)
from compacter_jax.models import T5Config, T5ForConditionalGeneration, init_params, save_pretrained
from compacter_jax.tokenizer import load_tokenizer
from compacter_jax.train import (Checkpointer, TrainState, make_optimizer, make_schedule,
                                 make_strategy, make_train_step, seq2seq_apply_fn)
from experiments import cli, reporting
from experiments.train_tokenizer import SPIECE, parse_text_sources, train_sentencepiece

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


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


def count_params(params: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params)))


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
    written to `<workdir>/summary.json` once training has finished)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    total_steps = int(config.num_train_steps)
    if total_steps <= 0:
        raise ValueError(f"--config.num_train_steps must be positive, got {total_steps}")

    # Data: chunks of the training text, corrupted afresh each epoch; a fixed corruption of
    # the held-out chunks for the loss check.
    documents = build_documents(config)
    tokenizer = build_tokenizer(config, workdir, documents)
    spec = span_corruption_spec(config, tokenizer)
    corpus = build_corpus(config, tokenizer, spec, documents)
    if corpus.train_chunks.shape[0] < config.batch_size:
        raise ValueError(f"--config.batch_size={config.batch_size} exceeds the "
                         f"{corpus.train_chunks.shape[0]} training chunks")
    log.info("corpus: %s", {k: v for k, v in corpus.summary().items() if k != "per_task"})

    def heldout_batches():
        return eval_batches(corpus.heldout_chunks, config.eval_batch_size, spec,
                            seed=config.heldout_corruption_seed)

    def heldout_denoise_batches():
        return denoise_eval_batches(corpus.heldout_chunks, config.eval_batch_size, spec,
                                    seed=config.heldout_corruption_seed)

    # Model and optimizer: full pretraining trains every parameter (nothing frozen).
    t5_config = model_config(config, len(tokenizer))
    init_rng = jax.random.PRNGKey(config.seed)
    params = initial_params(t5_config, config.seed)
    n_params = count_params(params)
    log.info("model: %s parameters (%s)", f"{n_params:,}", dict(config.model))
    steps = compiled_steps(t5_config, config.learning_rate,
                           min(config.warmup_steps, total_steps - 1), total_steps,
                           config.weight_decay, config.clip_norm,
                           config.get("optimizer", "adamw"))
    state = TrainState.create(params, steps.tx, jax.random.fold_in(init_rng, 1))
    del params
    strategy, compiled, sums_fn = steps.strategy, steps.train_step, steps.heldout_sums

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints,
                        best_mode="min")
    position, elapsed = DataState(), 0.0
    if (restored := ckpt.restore_latest(state)) is not None:
        state, meta = restored
        position = DataState.from_dict(meta["data_position"])
        elapsed = float(meta.get("train_seconds", 0.0))
        log.info("resumed from step %d at %s", int(state.step), position)
    step = int(np.asarray(state.step))
    frozen = strategy.put_frozen({})

    def export(directory: Path, host_params) -> None:
        # HF layout + the tokenizer's spiece.model when it is not the shared T5 vocabulary.
        save_pretrained(directory, t5_config.replace(dropout_rate=config.export_dropout_rate,
                                                     scan_layers=False), host_params)
        if config.tokenizer:
            spm = (workdir / "tokenizer" if config.tokenizer == "train"
                   else Path(config.tokenizer)) / SPIECE
            shutil.copyfile(spm, directory / SPIECE)
    dev_state = strategy.replicate(state)

    writer = reporting.MetricsWriter(workdir)
    progress = reporting.Progress(total_steps, config.batch_size)
    stop_at = total_steps if config.stop_after <= 0 else min(total_steps,
                                                             step + config.stop_after)
    batches = mixture_batches(corpus.train_chunks, config.batch_size, spec, seed=config.seed,
                              denoise_fraction=config.denoise_fraction, state=position)
    pending: list[tuple[int, Any]] = []
    window: list[dict] = []
    last_heldout: dict[str, float] | None = None
    started = time.perf_counter()

    def every(n: int) -> bool:
        return n > 0 and step % n == 0

    def flush() -> None:
        # One host sync per interval; refuse to go on (or save) after a non-finite update.
        records = [(s, strategy.unreplicate(m)) for s, m in pending]
        pending.clear()
        for s, m in records:
            record = {k: float(v) for k, v in m.items()}
            if not (np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"])):
                raise FloatingPointError(
                    f"non-finite training loss at step {s} ({record}); no checkpoint was "
                    "written for it: lower --config.learning_rate")
            window.append({"step": s, **record})

    try:
        while step < stop_at:
            batch, next_position = next(batches)
            dev_state, metrics = compiled(dev_state, frozen, strategy.shard_batch(batch))
            step += 1
            position = next_position
            pending.append((step, metrics))
            last = step == total_steps
            do_eval = every(config.eval_every) or last
            do_save = every(config.save_every) or last or step == stop_at
            if not (every(config.log_every) or do_eval or do_save):
                continue
            flush()
            if every(config.log_every) or last:
                progress.update(step, window)
                means = {k: float(np.mean([w[k] for w in window]))
                         for k in window[-1] if k != "step"}
                writer.write(step, {f"train/{k}": v for k, v in means.items()})
                window = []
            if do_eval:
                start = time.perf_counter()
                last_heldout = heldout_loss(sums_fn, dev_state.params, heldout_batches())
                record = {"heldout/loss": last_heldout["loss"]}
                if config.eval_diagnostics:
                    diag = heldout_diagnostics(steps.token_losses, dev_state.params,
                                               heldout_batches(), spec)
                    record.update({f"heldout/{k}": v for k, v in diag.items() if k != "loss"})
                    record["heldout/encoder_gain"] = (diag["mismatched_inputs_loss"]
                                                      - diag["loss"])
                if config.denoise_fraction > 0:
                    record["heldout/denoise_loss"] = heldout_loss(
                        sums_fn, dev_state.params, heldout_denoise_batches())["loss"]
                writer.write(step, record)
                progress.note(f"step {step}: " + ", ".join(
                    f"{k.split('/')[1]} {v:.4f}" for k, v in record.items())
                    + f" ({time.perf_counter() - start:.1f}s)")
                if config.export_snapshots and not last:
                    export(workdir / "snapshots" / f"step_{step}",
                           strategy.unreplicate(dev_state.params))
            if do_save:
                seconds = elapsed + time.perf_counter() - started
                ckpt.save(step, strategy.unreplicate(dev_state),
                          {"data_position": position.to_dict(), "train_seconds": seconds,
                           "config": config.to_dict()})
    finally:
        ckpt.wait()
        progress.close()
    ckpt.close()
    train_seconds = elapsed + time.perf_counter() - started
    if step < total_steps:  # stopped on purpose (stop_after): the next run resumes
        writer.close()
        log.info("stopped at step %d of %d; rerun with the same --workdir to resume", step,
                 total_steps)
        return {"steps": step, "finished": False}

    host_params = strategy.unreplicate(dev_state.params)
    if last_heldout is None:  # resumed exactly at the end: nothing evaluated in this process
        last_heldout = heldout_loss(sums_fn, host_params, heldout_batches())
    export_dir = Path(config.export_dir) if config.export_dir else workdir / "hf"
    export(export_dir, host_params)
    diagnostics = heldout_diagnostics(steps.token_losses, host_params, heldout_batches(), spec)
    history = writer.read()
    train_losses = [h["train/loss"] for h in history if "train/loss" in h]
    summary = {
        "steps": total_steps, "finished": True,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_train_loss_window": config.log_every,
        "heldout_loss": last_heldout["loss"], "heldout_tokens": last_heldout["tokens"],
        "heldout_diagnostics": diagnostics,
        "heldout_corruption_seed": config.heldout_corruption_seed,
        "eval_batch_size": config.eval_batch_size,
        "parameters": n_params, "export_dir": str(export_dir),
        "tokens_per_step": config.batch_size * (spec.inputs_length + spec.targets_length),
        "vocab_size": t5_config.vocab_size, "tokenizer_size": len(tokenizer),
        "span_corruption": {"inputs_length": spec.inputs_length,
                            "targets_length": spec.targets_length,
                            "tokens_length": spec.tokens_length,
                            "noise_density": spec.noise_density,
                            "mean_noise_span_length": spec.mean_noise_span_length},
        "corpus": corpus.summary(), "config": config.to_dict(),
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    writer.close()
    log.info("done: %d steps in %.0fs, train loss %.4f, held-out loss %.4f -> %s", total_steps,
             train_seconds, summary["final_train_loss"] or float("nan"),
             summary["heldout_loss"], export_dir)
    return summary


def main(argv: list[str]) -> int:
    cli.setup_logging(argv)
    if cli.printed_config():
        return 0
    return cli.exit_code(train_and_evaluate, flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    cli.define_flags("experiments/configs/pretrain.py",
                     "Directory for checkpoints, metrics and the HF export.",
                     "Pretraining config file (ml_collections).")
    app.run(lambda argv: sys.exit(main(argv)))
