# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Compacter++ in your own training loop
#
# No trainer, no config system: a T5 with Compacter++, a batch dict, a loss, `jax.grad` and an
# optax optimizer, written out by hand, with `compacter_jax` (`cj`) supplying only the model,
# the trainable/frozen split and the adapter file.
#
# > The backbone is a *randomly initialised* 2-layer T5 (`random:t5-tiny`), so the model learns
# > nothing useful in these few steps; the point is the loop. Replace `BACKBONE` by a checkpoint
# > directory or a cached Hub id (e.g. `t5-base`) to do it for real.

# %%
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported

import functools
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import compacter_jax as cj

BACKBONE = "random:t5-tiny"
SEED = 0

# %% [markdown]
# ## 1. The model and what is trained
#
# `cj.from_pretrained` loads the backbone and initialises only the method's new parameters.
# `method.partition` splits the parameter tree: gradients and optimizer state will exist for the
# trainable part only (Compacter++'s adapters after each feed-forward sublayer, the one shared
# PHM rule, and the layer-norm scales, as in the paper).

# %%
method = cj.get_method("compacter++", reduction_factor=8)   # t5-tiny: d_model 64 -> bottleneck 8
model, params = cj.from_pretrained(BACKBONE, method, rng=jax.random.PRNGKey(SEED))
trainable, frozen = method.partition(params)
print(f"trainable {cj.count(trainable):,} of {cj.count(params):,} parameters "
      f"({100 * cj.count(trainable) / cj.count(params):.2f}%)")
print("trainable groups:", sorted(trainable))

# %% [markdown]
# ## 2. A batch
#
# The model takes `input_ids`, `attention_mask`, `decoder_input_ids` (the targets shifted right)
# and `decoder_attention_mask`; the loss needs the `labels`. `cj.make_batch` builds that dict
# from text pairs with a T5 tokenizer (`pack=True` gives the packed form, several examples per
# row). The tokenizer here is the one shipped with the embedded backbone (`t5-mini-glue`: the
# 8,100-entry SentencePiece vocabulary it was pretrained with), so the notebook needs no data
# folder.

# %%
sources = ["rte sentence1: A cat sat on the mat. sentence2: A cat is sitting.",
           "rte sentence1: It rained all day. sentence2: The ground is dry."]
targets = ["entailment", "not_entailment"]
tokenizer = cj.load_tokenizer("t5-mini-glue")
batch = cj.make_batch(tokenizer, sources, targets, max_source_length=32, max_target_length=8)
print({k: v.shape for k, v in batch.items()})

# %% [markdown]
# ## 3. The loop
#
# The loss is the token cross-entropy over real label tokens. Only `trainable` is an argument
# of `jax.grad`; `frozen` is passed in (not closed over, so it is not baked into the compiled
# step as a constant) and `method.combine` puts the two trees back together.

# %%
tx = optax.adamw(learning_rate=1e-2)
opt_state = tx.init(trainable)


def loss_fn(trainable, frozen, batch, dropout_key=None):
    """Mean token cross-entropy; dropout on when a key is given (training)."""
    logits = model.apply({"params": method.combine(trainable, frozen)},
                         batch["input_ids"], batch["attention_mask"],
                         batch["decoder_input_ids"], batch["decoder_attention_mask"],
                         deterministic=dropout_key is None,
                         rngs=None if dropout_key is None else {"dropout": dropout_key})
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    mask = batch["decoder_attention_mask"]
    return (token_loss * mask).sum() / mask.sum()


@jax.jit
def train_step(trainable, opt_state, frozen, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, key)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss


eval_loss = jax.jit(loss_fn)
before = float(eval_loss(trainable, frozen, batch))
key = jax.random.PRNGKey(SEED)
losses = []
for step in range(8):
    trainable, opt_state, loss = train_step(trainable, opt_state, frozen, batch,
                                            jax.random.fold_in(key, step))
    losses.append(float(loss))
after = float(eval_loss(trainable, frozen, batch))
print("training losses (with dropout):", np.round(losses, 3))
print(f"loss without dropout: {before:.3f} before, {after:.3f} after")
assert after < before, "the loss should go down on a batch seen 8 times"

# %% [markdown]
# ## 4. Save the adapter, load it back
#
# `cj.save_adapter` writes the trainable tree alone (a few KB here) with the method and the
# backbone it belongs to; `cj.load_adapter` rebuilds that backbone (a `random:` one from the
# recorded seed) and puts the adapter in place. The reloaded model gives the trained logits.

# %%
out = Path(tempfile.mkdtemp()) / "adapter"
cj.save_adapter(out, trainable, method, model=BACKBONE, init_seed=SEED)
print(sorted(p.name for p in out.iterdir()),
      f"{sum(p.stat().st_size for p in out.iterdir()) / 1024:.1f} KB")
model2, params2 = cj.load_adapter(out)


@functools.partial(jax.jit, static_argnums=0)   # the model (hashable) is static: one compile
def logits(model, params):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["decoder_input_ids"], batch["decoder_attention_mask"])


trained = method.combine(trainable, frozen)
diff = float(jnp.abs(logits(model2, params2) - logits(model, trained)).max())
print("max |logit difference| after reload:", diff)
assert diff == 0.0
