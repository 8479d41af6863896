"""Fine-tuning config for `python -m experiments.glue`.

`--config experiments/configs/glue.py` is the quick default that `make run` uses: Compacter++ on
SST-2, capped so that it finishes in minutes on a 2-core CPU. `--config experiments/configs/glue.py:paper`
is the paper's recipe (paper §5: 20 epochs on small tasks, batch 100, warm-up 500, source length
128). Every field can be overridden from the command line, e.g. `--config.task=mrpc
--config.method=compacter`; `--config.peft.<field>` overrides a field of the method's preset
(the fields come from the method dataclasses, `compacter_jax.peft.cli_fields()`).
"""

from __future__ import annotations

import ml_collections

from compacter_jax.peft import registry

# The model `make run` asks for (downloaded from the Hub on first use); only this one falls back
# to `fallback_model`, and only when it is not cached and the Hub cannot be reached (offline,
# no connection). A model the user names, a missing or gated repo, never fall back.
DEFAULT_MODEL = "t5-base"


def peft_fields() -> ml_collections.ConfigDict:
    """One placeholder (None = keep the preset's value) per field of any registered method."""
    return ml_collections.ConfigDict({
        name: ml_collections.config_dict.placeholder(kind)
        for name, kind in sorted(registry.cli_placeholder_types().items())})


def get_config(variant: str = "quick") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # What to train.
    c.task = "sst2"  # a task a small backbone can show learning on
    c.method = "compacter++"
    # Per-method overrides of the PEFT preset (None keeps the preset's value).
    c.peft = peft_fields()
    # Model: a Hub id (downloaded into the HF cache on first use), a local HF checkpoint dir,
    # t5-mini-glue (shipped with the package) or random:<preset>. When the Hub cannot be
    # reached and the default model (t5-base) is not cached, `fallback_model` is used with a
    # banner; any other model that does not load is an error ("" disables the fallback).
    c.model = DEFAULT_MODEL
    c.fallback_model = "t5-mini-glue"  # pretrained here (checkpoints/); random:<preset> also works
    c.dtype = "float32"
    c.scan_layers = True
    c.remat = False
    # "" = the model's own (spiece.model of its folder or Hub repo; the shared T5 vocabulary
    # under $COMPACTER_DATA_DIR/t5_vocab for random:<preset>); a directory or Hub id overrides.
    c.tokenizer = ""
    # Data: "tfds", "files", or "auto" (the local files where they hold the task, else TFDS:
    # prepared there, or downloaded and prepared once when the network answers).
    c.source = "auto"
    # "" = $COMPACTER_DATA_DIR (files) / TFDS default (tfds); a files folder may be the one
    # holding glue/ and superglue/, or glue/ or superglue/ itself.
    c.data_dir = ""
    # None: auto/tfds download what is missing (when the network answers); False: never.
    c.download = ml_collections.config_dict.placeholder(bool)
    c.max_source_length = 128
    c.max_target_length = -1  # -1: the task's (its longest label; 128 for free-text targets)
    c.train_samples = -1  # > 0: the original's seeded low-resource subsample of the train set
    c.max_eval_samples = -1  # > 0: at most N validation/test examples (the original's way)
    # None: the method's rule (the original prefixes the task name unless adapters are trained).
    c.add_task_prefix = ml_collections.config_dict.placeholder(bool)
    # Several examples per row (same examples per step); None: on when the method supports it.
    c.packing = ml_collections.config_dict.placeholder(bool)
    # Packed shapes: at most N row counts, each with at most M shorter target lengths (0: one
    # target length). The train step compiles once per shape, so fewer shapes start faster
    # and pad more (SST-2, batch 32: 4 x 4 = 11 shapes in 1,500 steps; 2 x 0 = 2 shapes, 10%
    # more source padding).
    c.packing_row_buckets = 4
    c.packing_target_buckets = 4
    # > 0: each padded training batch (packing off, DP) keeps source columns up to its longest
    # source rounded up to a multiple of N (padding skipped; one compilation per width); 0: all
    # max_source_length columns. Same loss and gradients (dropout aside: its masks are drawn
    # per position, so a cut batch draws other ones).
    c.source_bucket = 0
    # Optimisation (paper §5).
    c.batch_size = 100  # global batch, split over devices and hosts
    c.eval_batch_size = 100
    # None: the paper's rate for the method (`Method.learning_rate`).
    c.learning_rate = ml_collections.config_dict.placeholder(float)
    # Multiplies the method's rate (not an explicit learning_rate). None: 10 on the embedded
    # t5-mini-glue, whose adapters need it (docs/small_scale.md), 1 on any other model.
    c.learning_rate_scale = ml_collections.config_dict.placeholder(float)
    c.warmup_steps = 500
    c.weight_decay = 0.0
    c.clip_norm = 1.0
    # "adamw" (optax.adamw) or "hf_adamw" (transformers' AdamW + torch's clipping, the
    # original's: eps on the uncorrected sqrt(v); `compacter_jax.train.optim.hf_adamw`).
    c.optimizer = "adamw"
    # True: the embedding (and an untied lm_head) cut to the tokenizer's entries before
    # training, as the original's `resize_token_embeddings(len(tokenizer))` (32,128 -> 32,100).
    c.resize_vocab_to_tokenizer = False
    c.epochs = -1  # -1: 20 on small tasks, 3 on large ones (paper §5)
    c.max_steps = -1  # > 0 caps the number of steps (and the schedule length)
    c.seed = 42  # initialisation (of a random backbone and the method), dropout, data order
    c.data_seed = 42  # the paper's validation/test halves and low-resource subsamples
    _run_fields(c)
    variants = {"quick": _quick, "paper": _paper}
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}: use glue.py (quick) or glue.py:paper")
    variants[variant](c)
    return c


def _quick(c: ml_collections.ConfigDict) -> None:
    """Under 5 minutes on 2 CPU cores with the embedded backbone (t5-mini-glue, 9.4M
    parameters): 1,500 steps of batch 32 (0.7 epochs of SST-2), every validation and test
    row; the rate is the method's, times 10 on that backbone (`learning_rate_scale`). Two
    packed shapes (two compilations) instead of up to 16."""
    c.batch_size = 32
    c.eval_batch_size = 100
    c.warmup_steps = 100
    c.max_steps = 1500
    c.eval_every = 500
    c.packing_row_buckets = 2
    c.packing_target_buckets = 0


def _paper(c: ml_collections.ConfigDict) -> None:
    """The original's optimizer, vocabulary and rates (COMPACTER_SPEC.md §5)."""
    c.learning_rate_scale = 1.0
    c.optimizer = "hf_adamw"
    c.resize_vocab_to_tokenizer = True


def _run_fields(c: ml_collections.ConfigDict) -> None:
    """How the run goes: parallelism, processes, dropout keys, privacy, logging, workdir."""
    # Parallelism: "jit" (Mesh + NamedSharding) or "pmap"; num_devices -1 = all local devices.
    c.strategy = "jit"
    c.num_devices = -1
    c.shard_frozen = False  # jit only: shard the frozen backbone over devices (large T5s)
    # Multi-process (multi-host) runs through jax.distributed: each setting "" / -1 falls back
    # to $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID; with none set the
    # run is one process. detect_cluster=True lets JAX detect the rest (TPU pod slices, SLURM,
    # Open MPI, Kubernetes). The global batch is split over all devices of all processes.
    c.coordinator_address = ""  # host:port of process 0
    c.num_processes = -1
    c.process_id = -1
    c.detect_cluster = False
    # Dropout: masks are keyed by global row either way, so jit, pmap and one device agree.
    # True vmaps the model over examples (a key each; ~17% step time for Compacter on CPU).
    c.per_example_dropout = False
    # Differential privacy (DP-SGD / DP-Adam on the trainable parameters, any method): on when
    # noise_multiplier or a target epsilon is set (not both; the noise is then calibrated so
    # the whole run spends at most epsilon). Poisson sampling at rate batch_size / train rows,
    # padded batches (no packing), per-example clipping at clip_norm (the optimizer's global
    # clip_norm is then off); delta None: 1 / N**1.1 (below 1/N). See experiments/dp.py.
    c.dp = ml_collections.ConfigDict()
    c.dp.noise_multiplier = ml_collections.config_dict.placeholder(float)
    c.dp.epsilon = ml_collections.config_dict.placeholder(float)
    c.dp.clip_norm = 1.0
    c.dp.delta = ml_collections.config_dict.placeholder(float)
    c.dp.accountant = "rdp"  # "rdp" (Renyi DP) or "pld" (privacy loss distributions, tighter)
    c.dp.microbatch_size = -1  # > 0: per-example gradients in chunks of N examples (memory)
    # Logging, evaluation, checkpoints.
    c.log_every = 10
    c.eval_every = -1  # steps; -1 = once per epoch; 0 = never (no best checkpoint)
    c.save_every = -1  # steps; -1 = at every evaluation
    c.keep_checkpoints = 2
    # Workdir: one run at a time (a lock); a resume must match the run's stored config.
    c.allow_config_change = False  # True: resume with changed fields (e.g. more steps)
    c.force_unlock = False  # True: take over a lock recorded by a run on another host
    c.eval_test = True  # evaluate the test split at the best validation checkpoint
    # "generate" (greedy decoding, the paper's), "rank" (the most likely label string), "both".
    c.eval_mode = "generate"
