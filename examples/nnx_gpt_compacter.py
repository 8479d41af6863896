"""Compacter++ on a decoder-only LM written in Flax NNX, without touching the model's code.

1. a small character-level GPT (plain NNX, nothing from compacter-jax) is pretrained briefly on
   one text and its weights saved with orbax (the backbone checkpoint);
2. `cj.inject` puts a Compacter++ adapter after every block's MLP, with one shared PHM rule;
3. only the adapters train (`nnx.Optimizer(..., wrt=AdapterParam)`) on a second text: the
   backbone weights stay bit-identical;
4. the adapter is saved (a few KB), then loaded onto a freshly restored backbone: same logits.

    python examples/nnx_gpt_compacter.py --pretrain_steps 150 --steps 100 --out /tmp/gpt

Runs in well under a minute on a laptop CPU with the defaults.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import compacter_jax as cj

PRETRAIN_TEXT = "the quick brown fox jumps over the lazy dog. " * 40
ADAPT_TEXT = "pack my box with five dozen liquor jugs. " * 40
VOCAB = sorted(set(PRETRAIN_TEXT + ADAPT_TEXT))


class MLP(nnx.Module):
    def __init__(self, d: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, h):
        return self.fc2(nnx.gelu(self.fc1(h)))


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = MLP(d, rngs=rngs)

    def __call__(self, h, mask):
        h = h + self.attn(self.ln1(h), mask=mask)
        return h + self.mlp(self.ln2(h))


class GPT(nnx.Module):
    """Token + position embeddings, pre-norm blocks, tied output projection."""

    def __init__(self, vocab: int, d: int = 64, layers: int = 2, heads: int = 4,
                 max_len: int = 64, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d)))
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        mask = nnx.make_causal_mask(ids)
        for block in self.blocks:
            h = block(h, mask)
        return self.embed.attend(self.ln(h))


def batches(text: str, batch: int, length: int, seed: int):
    """Endless random windows of `text` as int32 [batch, length] token ids."""
    ids = np.array([VOCAB.index(c) for c in text], np.int32)
    rng = np.random.default_rng(seed)
    while True:
        start = rng.integers(0, len(ids) - length, batch)
        yield jnp.asarray(np.stack([ids[s:s + length] for s in start]))


def loss_fn(model, ids):
    logits = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def train(model, wrt, text: str, steps: int, lr: float, seed: int) -> list[float]:
    """`steps` AdamW steps on the parameters `wrt` selects; returns the losses."""
    optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, ids):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, ids)
        optimizer.update(model, grads)
        return loss

    data = batches(text, 16, 33, seed)
    return [float(step(model, optimizer, next(data))) for _ in range(steps)]


def restore_backbone(path: Path) -> GPT:
    """The backbone rebuilt from its orbax checkpoint."""
    abstract = nnx.eval_shape(lambda: GPT(len(VOCAB), rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = ocp.StandardCheckpointer().restore(path, abstract_state)
    return nnx.merge(graphdef, state)


def main(pretrain_steps: int = 150, steps: int = 100, out: str | None = None) -> dict:
    out_dir = Path(out or tempfile.mkdtemp(prefix="nnx_gpt_"))
    model = GPT(len(VOCAB), rngs=nnx.Rngs(0))
    pre = train(model, nnx.Param, PRETRAIN_TEXT, pretrain_steps, 3e-3, seed=0)
    print(f"backbone pretrained: loss {pre[0]:.3f} -> {pre[-1]:.3f}")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / "backbone", nnx.state(model), force=True)
    checkpointer.wait_until_finished()

    # Compacter++ after every block's MLP (d_model = 64, bottleneck 64/8 = 8, n = 4).
    model, injection = cj.inject(model, "compacter++", where=r"blocks/\d+/mlp$",
                                 features=64, reduction_factor=8, rngs=nnx.Rngs(1))
    adapter = cj.nnx_layers.AdapterParam
    frozen = nnx.All(nnx.Param, nnx.Not(adapter))
    n_train = sum(v.size for v in jax.tree.leaves(nnx.state(model, adapter)))
    n_frozen = sum(v.size for v in jax.tree.leaves(nnx.state(model, frozen)))
    print(f"trainable {n_train} of {n_train + n_frozen} parameters "
          f"({100 * n_train / (n_train + n_frozen):.2f}%)")
    before = jax.tree.map(np.asarray, nnx.state(model, frozen))
    losses = train(model, adapter, ADAPT_TEXT, steps, 1e-2, seed=1)
    print(f"adapter trained: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    same = all(np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(nnx.state(model, frozen))))
    print(f"backbone weights unchanged: {same}")

    injection.save(out_dir / "adapter", model, backbone=str(out_dir / "backbone"))
    fresh = restore_backbone(out_dir / "backbone")
    fresh, _ = cj.inject(fresh, "compacter++", where=r"blocks/\d+/mlp$", features=64,
                         reduction_factor=8, rngs=nnx.Rngs(2))
    injection.load(out_dir / "adapter", fresh)
    ids = next(batches(ADAPT_TEXT, 2, 32, seed=2))
    diff = float(jnp.abs(fresh(ids) - model(ids)).max())
    print(f"reloaded adapter: max |logit difference| = {diff}")
    return {"pretrain_losses": pre, "losses": losses, "frozen_unchanged": same,
            "reload_max_diff": diff, "out": str(out_dir)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain_steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=None, help="output directory (default: a temp dir)")
    args = parser.parse_args()
    main(args.pretrain_steps, args.steps, args.out)
