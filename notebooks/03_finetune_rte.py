# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Fine-tune Compacter++ on RTE, save the adapter, load it back, predict
#
# The whole workflow on a T5 small enough for a laptop CPU (about a minute):
#
# 1. a T5 backbone (a checkpoint directory, or a Hub id in the local HF cache);
# 2. Compacter++ inserted into it, and the split into trainable / frozen parameters;
# 3. a short training run on the real RTE files with `experiments.finetune.train_and_evaluate`
#    (the function behind `python -m experiments.glue`);
# 4. the training curves;
# 5. the adapter saved alone (`save_adapter`), loaded back onto the backbone (`load_adapter`),
#    and a check that it gives the same logits as the trained model;
# 6. predictions for new sentence pairs with greedy decoding.
#
# > **The scores here mean nothing.** No pretrained T5 weights are available on this machine,
# > so the notebook trains adapters on a *randomly initialised* 2-layer T5 (`t5-tiny`) for a few
# > dozen steps. The model has not learned English; it will mostly generate junk, and the
# > accuracy will sit at chance or at 0 (unparseable outputs). The point is the workflow. To do
# > it for real, set `PRETRAINED` below to a checkpoint (e.g. `t5-base`) and train for the
# > paper's 20 epochs (`experiments/configs/glue.py:paper`).

# %%
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported

import json
import shutil
import tempfile
import time

import jax
import matplotlib.pyplot as plt
import numpy as np

from compacter_jax import data as data_lib
from compacter_jax import params as param_report
from compacter_jax import peft
from compacter_jax.models import from_pretrained, greedy_generate, hf_io, save_pretrained
from compacter_jax.paths import DATA_DIR_ENV, checkpoints_dir, data_dir
from compacter_jax.tokenizer import tokenizer_for_model
from compacter_jax.train import Checkpointer

NOTEBOOK_START = time.perf_counter()

# %% [markdown]
# ## 0. The data
#
# The RTE files are read from `compacter_jax.paths.data_dir()`, i.e. `$COMPACTER_DATA_DIR`
# (default `../shared/data` next to the checkout). Without them there is nothing to train on:
# the notebook says so and the remaining cells do nothing. (The tokenizer comes with the
# backbone, below: no vocabulary file is needed here.)

# %%
task = data_lib.get_task("rte")
files = data_lib.FilesSource()
needed = [files.path(task, "train"), files.path(task, "validation")]
missing = [p for p in needed if not p.is_file()]
HAVE_DATA = not missing
if HAVE_DATA:
    print("data:", data_dir())
else:
    print(f"SKIPPING the rest of this notebook: {', '.join(map(str, missing))} not found.\n"
          f"Set ${DATA_DIR_ENV} to the directory holding glue/RTE/.")
    try:  # in Jupyter: turn every following cell into a no-op, so the notebook still completes
        get_ipython().input_transformers_cleanup.append(lambda lines: ["pass\n"])  # noqa: F821
    except NameError:  # run as a plain script
        raise SystemExit(0)

# %% [markdown]
# ## 1. The backbone
#
# Everything below takes the backbone as a name: a directory with HF's `config.json`,
# `model.safetensors` and the tokenizer's `spiece.model`, or a Hub id (`t5-base`,
# `google/t5-v1_1-base`, ...: downloaded into the HF cache on first use). Here we make a random
# `t5-tiny` and save it as such a directory, exactly like a real checkpoint, with the
# embedded backbone's tokenizer (its own 8,100-entry vocabulary). (Saving matters: `random:t5-tiny`
# would draw new weights on every load, and an adapter only makes sense on the backbone it was
# trained with.)

# %%
PRETRAINED = os.environ.get("COMPACTER_PRETRAINED") or None  # e.g. "t5-base" or "/ckpts/t5-base"
WORK = Path(tempfile.mkdtemp(prefix="compacter_rte_"))  # everything this notebook writes

if PRETRAINED is None:
    backbone, backbone_params = from_pretrained("random:t5-tiny", rng=jax.random.PRNGKey(0))
    MODEL = str(save_pretrained(WORK / "t5-tiny-random", backbone.config, backbone_params))
    shutil.copy(checkpoints_dir() / "t5-mini-glue" / "spiece.model", MODEL)  # its tokenizer
    del backbone, backbone_params
else:
    MODEL = PRETRAINED
t5_config = param_report.resolve_model(MODEL)
print(f"backbone {MODEL}: d_model={t5_config.d_model}, {t5_config.num_layers}+"
      f"{t5_config.num_decoder_layers} blocks")

# %% [markdown]
# ## 2. Compacter++ in the backbone
#
# Compacter++ adds one LPHM adapter after each feed-forward sublayer. The paper's reduction
# factor 32 would leave no bottleneck on `d_model = 64`, so we use 8 (bottleneck 8, divisible
# by `n = 4`). `peft.from_pretrained(checkpoint, method)` loads the backbone unchanged and
# initialises only the new parameters; `method.partition` separates what is trained (adapters,
# the shared rule, layer norms) from the frozen rest, and the optimizer only ever sees the
# former.

# %%
REDUCTION_FACTOR = 8 if PRETRAINED is None else 32
method = peft.get_method("compacter++", reduction_factor=REDUCTION_FACTOR)
model, params = peft.from_pretrained(MODEL, method)
trainable, frozen = method.partition(params)
print(f"trainable {peft.count(trainable):,} of {peft.count(params):,} parameters "
      f"({100 * peft.count(trainable) / peft.count(params):.3f}%)")
print(param_report.format_table([param_report.report(t5_config, method)], {}))
print("\ntrainable parameters of one block:")
for path, leaf in jax.tree_util.tree_flatten_with_path(trainable["encoder"]["block_0"])[0]:
    print(f"  encoder/block_0/{'/'.join(k.key for k in path):40s} {tuple(leaf.shape)}")

# %% [markdown]
# ## 3. Train on RTE
#
# `experiments/configs/glue.py:get_config()` is the experiment config (`ml_collections`); we
# shrink it to a few dozen steps on short inputs. `train_and_evaluate(config, workdir)` reads
# the paper's splits (RTE's official validation set split in half into validation and test),
# tokenises, trains only the trainable tree (AdamW with warm-up and linear decay, gradient
# clipping), evaluates by greedy decoding every `eval_every` steps, keeps the best validation
# checkpoint, evaluates it on the test half and exports the adapter. The same run from the
# shell:
#
# ```
# python -m experiments.glue --config experiments/configs/glue.py --workdir runs/rte \
#     --config.model=t5-base --config.max_steps=30
# ```

# %%
from experiments.configs.glue import get_config
from experiments.finetune import target_length, train_and_evaluate

config = get_config()  # the "quick" variant; get_config("paper") is the paper's recipe
config.task = "rte"
config.model = MODEL
config.fallback_model = ""          # fail instead of silently training a random model
config.peft.reduction_factor = REDUCTION_FACTOR
config.source = "files"
config.scan_layers = False          # same parameter layout as `params` above
config.num_devices = 1
config.max_source_length = 64       # RTE pairs are longer; truncating is fine for a demo
config.batch_size = 16
config.eval_batch_size = 32
config.max_eval_samples = 32        # validate / test on the first 32 examples of each half
config.max_steps = 30
config.warmup_steps = 5
config.eval_every = 10
config.eval_mode = "generate"  # greedy decoding only (the quick default also ranks labels)
config.log_every = 5
config.keep_checkpoints = 1

RUN = WORK / "run"
start = time.perf_counter()
summary = train_and_evaluate(config, RUN)
print(f"\ntrained in {time.perf_counter() - start:.0f}s; files: {sorted(p.name for p in RUN.iterdir())}")

# %% [markdown]
# ## 4. Curves
#
# Every metric the run logged is in `RUN/metrics.jsonl` (and in TensorBoard format under
# `RUN/tensorboard`). With a random backbone the loss falls a little as the adapters and
# layer norms fit the label tokens, but the generated text is rarely a valid label.

# %%
history = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
train = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
val = [(h["step"], h["validation/accuracy"], h["validation/num_invalid"])
       for h in history if "validation/accuracy" in h]

fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 3.6))
ax_loss.plot(*zip(*train), marker=".")
ax_loss.set(xlabel="step", ylabel="token cross-entropy", title="training loss")
steps, acc, invalid = zip(*val)
ax_val.plot(steps, acc, marker="o", label="accuracy (%)")
ax_val.plot(steps, 100 * np.asarray(invalid) / config.max_eval_samples, marker="s",
            label="unparseable outputs (%)")
ax_val.set(xlabel="step", ylim=(-5, 105), title="validation (32 examples)")
ax_val.legend()
fig.suptitle("RTE · Compacter++ · " + ("random t5-tiny (scores are meaningless)"
                                        if PRETRAINED is None else MODEL))
fig.tight_layout()
plt.show()
print({k: v for k, v in summary.items() if k not in ("validation",)})

# %% [markdown]
# ## 5. Save the adapter, load it back
#
# The best validation checkpoint holds the trainable tree only. `save_adapter` writes it as
# safetensors plus a JSON with the method (`Method.to_dict()`), the backbone's name and a
# checksum manifest: a few KB
# here, about 0.4 MB for Compacter++ on T5-base, against 0.9 GB for the backbone.
# `load_adapter(path)` rebuilds the model from the recorded backbone and method and puts the
# trained parameters in place. (`train_and_evaluate` already exported the same tensors to
# `RUN/adapter`.)

# %%
with Checkpointer(RUN / "checkpoints") as ckpt:
    best, meta = ckpt.restore_best(trainable)
print(f"best checkpoint: step {meta['step']}, validation score {meta['score']:.1f}")

adapter_dir = peft.save_adapter(WORK / "rte_adapter", best, method, model=MODEL, task="rte")
for f in sorted(adapter_dir.iterdir()):
    print(f"  {f.name:28s} {f.stat().st_size:>8,} bytes")

# The run's own export holds the same tensors.
exported, exported_meta = peft.load_trainable(RUN / "adapter")
for a, b in zip(jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(best)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

reloaded_model, reloaded_params = peft.load_adapter(adapter_dir)  # backbone from the JSON
assert reloaded_model.config == model.config
print(f"reloaded {MODEL} + adapter: {peft.count(reloaded_params):,} parameters")

# %% [markdown]
# **Identical logits.** The reloaded model must compute exactly what the trained one does:
# backbone from the checkpoint directory + the best trainable tree, combined
# (`method.combine`),
# against the model that `load_adapter` rebuilt. The untrained adapter (initial parameters)
# gives different logits, so the check would notice a reload that silently lost the adapter.

# %%
# The backbone's own tokenizer (its folder's spiece.model), as the run used.
tokenizer = tokenizer_for_model(hf_io.model_dir(MODEL), vocab_size=model.config.vocab_size)
TARGET_LENGTH = target_length(config, task, tokenizer)  # -1 in the config: the task's labels
validation = data_lib.paper_splits(task, files, data_seed=config.data_seed)["validation"][:4]
encoded = data_lib.encode(task, validation, tokenizer, max_source_length=config.max_source_length,
                          max_target_length=TARGET_LENGTH)
batch = next(data_lib.eval_batches(encoded, 4))


def logits(model, params, batch):
    """[batch, target_len, vocab] float32 logits with dropout off."""
    return np.asarray(model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                                  batch["decoder_input_ids"], batch["decoder_attention_mask"],
                                  deterministic=True))


trained_logits = logits(model, method.combine(best, frozen), batch)
reloaded_logits = logits(reloaded_model, reloaded_params, batch)
initial_logits = logits(model, params, batch)
np.testing.assert_array_equal(reloaded_logits, trained_logits)
print("reloaded vs trained: max |diff| =", np.abs(reloaded_logits - trained_logits).max())
print("initial  vs trained: max |diff| =", np.abs(initial_logits - trained_logits).max())
assert np.abs(initial_logits - trained_logits).max() > 1e-4

# %% [markdown]
# ## 6. Predict on new sentence pairs
#
# Inputs must be formatted as in training: `task.source(example)` joins the fields as
# `"sentence1: … sentence2: …"` (GLUE RTE's field names; SuperGLUE's copy of RTE,
# `get_task("superglue_rte")`, uses `"premise: … hypothesis: …"`). The model generates the
# label index as text ("0" = entailment, "1" = not_entailment) and `task.parse_prediction`
# maps it back (-1 when the text is not a label, as expected from a random backbone).

# %%
pairs = [
    ("The cat sat on the mat all afternoon.", "A cat was sitting on a mat."),
    ("Paris is the capital and largest city of France.", "Berlin is the capital of France."),
    ("The company reported record profits in 2020.", "The company made money in 2020."),
]
sources = [task.source({"sentence1": p, "sentence2": h}) for p, h in pairs]
inputs = tokenizer(sources, padding=True, return_tensors="np")
generated = greedy_generate(reloaded_model, reloaded_params, inputs["input_ids"],
                            inputs["attention_mask"], max_new_tokens=TARGET_LENGTH)
for source, text in zip(sources, data_lib.decode_predictions(tokenizer, np.asarray(generated))):
    label = task.parse_prediction(text)
    name = task.label_names[label] if 0 <= label < task.num_classes else "invalid output"
    print(f"{source}\n   -> generated {text!r} -> {label} ({name})\n")

# %% [markdown]
# ## Doing it for real
#
# * Point `PRETRAINED` (or `$COMPACTER_PRETRAINED`) at a T5 checkpoint directory or a cached
#   Hub id (`hf download google-t5/t5-base --include config.json '*.safetensors*'` on a machine
#   with internet) and keep the paper's reduction factor 32.
# * Train with the paper's recipe, e.g.
#   `python -m experiments.glue --config experiments/configs/glue.py:paper --workdir runs/rte`.
# * Ship only `runs/rte/adapter/` and load it onto the same backbone with `load_adapter`.

# %%
shutil.rmtree(WORK, ignore_errors=True)
print(f"notebook finished in {time.perf_counter() - NOTEBOOK_START:.0f}s")
