"""A tiny self-contained encoder-decoder-like Flax model and toy data for the training tests.

It takes the same batch keys and follows the same `apply_fn` convention as the T5, so the
training machinery is tested without depending on the real model.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from compacter_jax.peft import partition

VOCAB, D, SRC, TGT = 16, 16, 6, 4


class ToySeq2Seq(nn.Module):
    """Embeds source, masked-mean-pools it, adds it to decoder embeddings; dropout + adapter."""

    dropout: float = 0.1

    @nn.compact
    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                 deterministic: bool = True):
        embed = nn.Embed(VOCAB, D, name="shared")
        h = nn.relu(nn.Dense(D, name="encoder")(embed(input_ids)))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        m = attention_mask[..., None].astype(jnp.float32)
        ctx = (h * m).sum(1, keepdims=True) / jnp.maximum(m.sum(1, keepdims=True), 1.0)
        y = nn.tanh(nn.Dense(D, name="decoder")(embed(decoder_input_ids) + ctx))
        y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
        y = y + nn.Dense(D, name="adapter")(y)       # the "PEFT" part
        return nn.Dense(VOCAB, name="lm_head")(y)     # [B, T, VOCAB]


@dataclasses.dataclass
class Toy:
    model: ToySeq2Seq
    trainable: dict
    frozen: dict

    def apply_fn(self, params, batch, deterministic, rngs):
        return self.model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                batch["decoder_input_ids"], batch["decoder_attention_mask"],
                                deterministic=deterministic, rngs=rngs)


def make_toy(dropout: float = 0.1, seed: int = 0) -> Toy:
    model = ToySeq2Seq(dropout=dropout)
    b = make_batch(np.random.default_rng(0), 2)
    params = model.init(jax.random.PRNGKey(seed), b["input_ids"], b["attention_mask"],
                        b["decoder_input_ids"], b["decoder_attention_mask"])["params"]
    flat = traverse_util.flatten_dict(params)
    labels = traverse_util.unflatten_dict(
        {k: partition.TRAINABLE if k[0] in ("adapter", "lm_head") else partition.FROZEN
         for k in flat})
    trainable, frozen = partition.split(params, labels)
    return Toy(model, trainable, frozen)


def make_batch(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Random int32 batch with ragged padding (masks of real lengths >= 1)."""
    src_len = rng.integers(1, SRC + 1, n)
    tgt_len = rng.integers(1, TGT + 1, n)
    attn = (np.arange(SRC)[None] < src_len[:, None]).astype(np.int32)
    dmask = (np.arange(TGT)[None] < tgt_len[:, None]).astype(np.int32)
    input_ids = rng.integers(1, VOCAB, (n, SRC)).astype(np.int32) * attn
    labels = rng.integers(1, VOCAB, (n, TGT)).astype(np.int32) * dmask
    dec_in = np.concatenate([np.zeros((n, 1), np.int32), labels[:, :-1]], 1)
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels,
            "decoder_input_ids": dec_in, "decoder_attention_mask": dmask}


class ToyData:
    """In-memory dataset with a resumable position (an opaque JSON-able dict, as the training
    machinery stores it): `self(position)` yields `(position_after, batch)` forever,
    reshuffling each epoch with a seed derived from it."""

    def __init__(self, num_examples: int = 24, batch_size: int = 8, seed: int = 0):
        self.examples = make_batch(np.random.default_rng(seed + 100), num_examples)
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = num_examples // batch_size

    def __call__(self, position=None):
        position = position or {"epoch": 0, "index": 0}
        epoch, index = position["epoch"], position["index"]
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(
                self.per_epoch * self.batch_size)
            for i in range(index, self.per_epoch):
                rows = order[i * self.batch_size:(i + 1) * self.batch_size]
                after = ({"epoch": epoch, "index": i + 1} if i + 1 < self.per_epoch
                         else {"epoch": epoch + 1, "index": 0})
                yield after, {k: v[rows] for k, v in self.examples.items()}
            epoch, index = epoch + 1, 0
