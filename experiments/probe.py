r"""Do a T5 backbone's frozen features carry a classification task's signal? A linear probe:

    python -m experiments.probe --model checkpoints/t5-mini-glue --task sst2 \
        [--tokenizer DIR] [--train-samples 6000] [--c 0.1] [--seed 0] [--out probe.json]

Features, each probed alone, standardised by the training rows' mean and std, into an L2
logistic regression (scikit-learn, `--c`): `encoder_mean`, `decoder_first` (the decoder's state
that becomes the first target token, the label) and `embedding_mean` (a bag of words, the
baseline any backbone gives). Data: the paper's splits (`load_paper_splits`, data_seed 42) of
the local files (`--data-dir`, default $COMPACTER_DATA_DIR), each text as fine-tuning feeds
the encoder (`data.encode`; `--add-prefix`: task name first, as the original for all but
adapters), in the model's own tokenizer unless `--tokenizer`. Fit on the first
`--train-samples` rows of a `--seed` permutation of the train split; scored on *validation*
only, never test: choosing a backbone or method by a probe is model selection, which the paper
does on validation. `--out`: {model, task, train_rows, validation_rows, majority (validation's
majority-class accuracy), accuracy: {feature: accuracy}, c, seed, ...}, written atomically.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax import data as data_lib
from compacter_jax.atomic import atomic_write
from compacter_jax.models import hf_io
from compacter_jax.tokenizer import tokenizer_for_model
from experiments import tool_cli


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, S, D] (any float) averaged where mask [B, S] (int/bool) is 1: [B, D] float32
    (zeros for a row without real tokens)."""
    m = mask.astype(jnp.float32)[..., None]
    return (x.astype(jnp.float32) * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


def embedding_mean(model, params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, D] float32: the masked mean of the input embeddings (`params["shared"]`; `model`
    unused). As every feature: input_ids [B, S] int32, attention_mask [B, S] 1 = real token."""
    del model
    return masked_mean(jnp.take(params["shared"]["embedding"], input_ids, axis=0), attention_mask)


def encoder_mean(model, params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, D] float32: the masked mean of `model.encode`'s output [B, S, D] (no dropout)."""
    hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    return masked_mean(hidden, attention_mask)


def decoder_first(model, params, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[B, D] float32: the decoder's final hidden state (after its last layer norm) at position
    0, given only the start token and `model.encode`'s output: what `model.decode` turns into
    the first logits (lm_head, after T5 v1.0's d_model**-0.5 scale), read from the decoder
    stack with flax's `capture_intermediates` (D features, not a V-wide logit vector)."""
    hidden = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
    start = jnp.full((input_ids.shape[0], 1), model.config.decoder_start_token_id, jnp.int32)
    is_decoder = lambda module, name: module.name == "decoder" and name == "__call__"  # noqa
    _, state = model.apply({"params": params}, start, hidden, attention_mask, method=model.decode,
                           capture_intermediates=is_decoder, mutable=["intermediates"])
    decoder_hidden = state["intermediates"]["decoder"]["__call__"][0][0]  # of (hidden, mask)
    return decoder_hidden[:, 0].astype(jnp.float32)


FEATURES = {"encoder_mean": encoder_mean, "decoder_first": decoder_first,
            "embedding_mean": embedding_mean}


@functools.partial(jax.jit, static_argnums=0)
def all_features(model, params, input_ids: jax.Array, attention_mask: jax.Array
                 ) -> dict[str, jax.Array]:
    """{feature: [B, D] float32} of every feature, one compiled program per shape."""
    return {name: fn(model, params, input_ids, attention_mask) for name, fn in FEATURES.items()}


def extract(model, params, encoded: data_lib.EncodedData, batch_size: int
            ) -> dict[str, np.ndarray]:
    """{feature: [N, D] float32} of the rows of `encoded`, in batches cut to the longest row
    rounded up to 32 columns, the last filled with empty rows (few shapes to compile)."""
    longest = int(encoded.attention_mask.sum(axis=1).max())
    width = min(encoded.input_ids.shape[1], -(-max(longest, 1) // 32) * 32)
    n, batch_size = len(encoded), min(batch_size, len(encoded))
    outs = []
    for rows in (slice(i, i + batch_size) for i in range(0, n, batch_size)):
        batch = data_lib.pad_batch({"ids": encoded.input_ids[rows, :width],
                                    "mask": encoded.attention_mask[rows, :width]}, batch_size)
        outs.append(jax.device_get(all_features(model, params, batch["ids"], batch["mask"])))
    return {name: np.concatenate([o[name] for o in outs])[:n] for name in FEATURES}


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray,
                   eval_y: np.ndarray, c: float, max_iter: int) -> float:
    """Accuracy on (eval_x [M, D], eval_y [M]) of an L2 logistic regression fit on (train_x
    [N, D], train_y [N] int classes), both standardised by the training rows' mean and std."""
    from sklearn.linear_model import LogisticRegression

    train_x, eval_x = train_x.astype(np.float64), eval_x.astype(np.float64)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    clf = LogisticRegression(C=c, max_iter=max_iter).fit((train_x - mean) / std, train_y)
    return float(clf.score((eval_x - mean) / std, eval_y))


def load_backbone(model_name: str, tokenizer_name: str):
    """(model, params, tokenizer); a missing or unusable one is an error naming its flag."""
    try:
        model, params = hf_io.from_pretrained(model_name)
        folder = hf_io.model_dir(model_name)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model {model_name}: {e}") from None
    try:
        tokenizer = tokenizer_for_model(folder, tokenizer_name or None, model=model_name,
                                        vocab_size=model.config.vocab_size)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer {tokenizer_name or '(the model folder)'}: {e}") from None
    return model, params, tokenizer


def load_data(args, task: data_lib.Task, tokenizer
              ) -> tuple[data_lib.EncodedData, data_lib.EncodedData]:
    """(train, validation) of the paper's splits, encoded as fine-tuning encodes them; train:
    the first `args.train_samples` rows of an `args.seed` permutation of the train split."""
    source = data_lib.make_source("files", data_dir=args.data_dir or None)
    splits = data_lib.load_paper_splits(task, source)
    train = splits["train"].examples
    keep = np.random.default_rng(args.seed).permutation(len(train))[:args.train_samples]
    encode = functools.partial(data_lib.encode, task, tokenizer=tokenizer,
                               max_source_length=args.max_length, add_prefix=args.add_prefix,
                               max_target_length=task.max_target_length(tokenizer))
    return encode([train[i] for i in keep]), encode(splits["validation"].examples)


def check_args(args: argparse.Namespace) -> data_lib.Task:
    """The task of `--task`, once it and the numeric flags are valid."""
    try:
        task = data_lib.get_task(args.task)
    except ValueError as e:
        raise ValueError(f"--task: {e}") from None
    if task.kind != "classification":
        raise ValueError(f"--task {args.task}: a {task.kind} task, but the probe fits a "
                         "classifier to class indices: choose a classification task (sst2, ...)")
    if not tool_cli.positive_finite(args.c) or args.max_length < 2:
        raise ValueError(f"--c {args.c} must be > 0, --max-length {args.max_length} >= 2")
    return task


def build_parser() -> argparse.ArgumentParser:
    p = tool_cli.parser("experiments.probe", __doc__)
    p.add_argument("--model", required=True, help="T5 directory, t5-mini-glue, random:<preset>")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: the model's)")
    p.add_argument("--task", default="sst2", help="a classification task (sst2, mrpc, ...)")
    p.add_argument("--train-samples", type=tool_cli.positive_int, default=6000)
    p.add_argument("--seed", type=int, default=0, help="seed of the training rows' permutation")
    p.add_argument("--c", type=float, default=0.1, help="inverse L2 strength of the probe")
    p.add_argument("--max-iter", type=tool_cli.positive_int, default=2000)
    p.add_argument("--max-length", type=tool_cli.positive_int, default=128)
    p.add_argument("--batch-size", type=tool_cli.positive_int, default=256)
    p.add_argument("--add-prefix", action="store_true", help="write the task name first")
    p.add_argument("--data-dir", default="", help="default: $COMPACTER_DATA_DIR")
    p.add_argument("--out", default="", help="JSON file for the results")
    return p


def run(args: argparse.Namespace) -> int:
    task = check_args(args)
    model, params, tokenizer = load_backbone(args.model, args.tokenizer)
    train, validation = load_data(args, task, tokenizer)
    train_y, val_y = (np.asarray(d.references, np.int64) for d in (train, validation))
    train_x, val_x = (extract(model, params, d, args.batch_size) for d in (train, validation))
    accuracy = {name: probe_accuracy(train_x[name], train_y, val_x[name], val_y, args.c,
                                     args.max_iter) for name in FEATURES}
    majority = float(np.bincount(val_y).max() / len(val_y))
    result = dict(model=args.model, task=task.name, train_rows=len(train),
                  validation_rows=len(validation), majority=majority, accuracy=accuracy,
                  c=args.c, seed=args.seed, max_length=args.max_length, add_prefix=args.add_prefix)
    print(f"linear probe of {args.model} on {task.name} ({len(train)} training rows, C={args.c})"
          f": validation accuracy, {len(validation)} rows")
    for name, value in [("majority class", majority), *accuracy.items()]:
        print(f"  {name:<16} {value:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return tool_cli.run(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
