"""Span-corruption pretraining config for `python -m experiments.pretrain`.

`--config experiments/configs/pretrain.py` is the recipe of the shipped `checkpoints/t5-mini-glue`
(about an hour on the 2-core CPU of this project; see that folder's README.md).
`--config experiments/configs/pretrain.py:mix` is issue 18's recipe (text corpora, its own
8k vocabulary, a span-corruption/denoising mixture; docs/small_scale.md).
`--config experiments/configs/pretrain.py:tiny` is a seconds-long smoke test (t5-tiny sizes, two
small tasks). Every field can be overridden, e.g. `--config.num_train_steps=200`.
"""

from __future__ import annotations

import ml_collections


def get_config(variant: str = "mini") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Data: the text of the paper's training splits (compacter_jax.data.corpus).
    c.tasks = ""  # comma-separated task names; "" = every task with local training data
    c.source = "files"
    c.data_dir = ""  # "" = $COMPACTER_DATA_DIR
    c.data_seed = 42  # paper splits and document order (held-out part)
    c.heldout_fraction = 0.01
    c.text_sources = ""  # unlabelled text/<name>.zip corpora: "all" or a comma-separated list
    c.tokenizer = ""  # "" = the real T5 vocabulary under $COMPACTER_DATA_DIR/t5_vocab; a dir
    #                   with spiece.model; "train": trained on the corpus (<workdir>/tokenizer)
    c.tokenizer_vocab_size = 8000  # SentencePiece pieces when tokenizer="train"
    c.vocab_size = 32128  # the model's embedding rows; 0 = the tokenizer's size
    c.denoise_fraction = 0.0  # share of batches with full-sequence denoising targets
    # Span corruption (T5): 15% noise in spans of mean length 3; 141 raw tokens -> 128 inputs
    # and 29 targets (random_spans_helper).
    c.inputs_length = 128
    c.noise_density = 0.15
    c.mean_noise_span_length = 3.0
    c.heldout_corruption_seed = 0  # the held-out chunks are corrupted once, with this seed
    # Model: a T5 v1.0 layout (ReLU FF, lm_head tied to the embedding, decoder output scaled):
    # tying keeps the 32,128 x d_model embedding, most of the weights, stored once.
    c.model = ml_collections.ConfigDict({
        "d_model": 256, "d_ff": 1024, "d_kv": 64, "num_heads": 4,
        "num_layers": 4, "num_decoder_layers": 4,
        "feed_forward_proj": "relu", "tie_word_embeddings": True,
        "scale_decoder_outputs": True,
        "dropout_rate": 0.0,  # pretraining: one pass-ish over little data, compute-bound
    })
    c.export_dropout_rate = 0.1  # written to config.json: T5's fine-tuning dropout
    c.scan_layers = False
    # Optimisation: AdamW, linear warm-up then linear decay to 0, global-norm clipping.
    # 1,400 steps of 16 chunks (22,400 chunks: ~2 passes over the 11k training chunks, new
    # noise each pass): 2.5 s a step measured on the shared 2-core CPU -> about an hour; the
    # shipped run took 92 minutes, the CPU being busier with other jobs then.
    c.optimizer = "adamw"  # or "adafactor" (T5's; rate relative to each parameter's RMS)
    c.batch_size = 16
    c.learning_rate = 2e-3
    c.warmup_steps = 100
    c.num_train_steps = 1400
    c.weight_decay = 0.01
    c.clip_norm = 1.0
    c.seed = 0  # parameter init, chunk order and noise masks
    # Logging, held-out loss, checkpoints.
    c.log_every = 50
    c.eval_every = 200
    c.eval_diagnostics = False  # also the encoder-swap diagnostic at each evaluation
    c.export_snapshots = False  # HF export of each evaluated step under <workdir>/snapshots
    c.eval_batch_size = 64
    c.save_every = 100  # a kill loses at most ~4 minutes
    c.keep_checkpoints = 2
    c.stop_after = -1  # > 0: stop this process after that many steps (as if killed); rerun resumes
    c.export_dir = ""  # "" = <workdir>/hf (config.json + model.safetensors)
    # Workdir: one run at a time (a lock); a resume must match the run's stored config.
    c.allow_config_change = False  # True: resume with changed fields (e.g. more steps)
    c.force_unlock = False  # True: take over a lock recorded by a run on another host

    variants = {"mini": lambda c: None, "mix": _mix, "tiny": _tiny}
    if variant not in variants:
        raise ValueError(f"unknown config variant {variant!r}: use pretrain.py, pretrain.py:mix or pretrain.py:tiny")
    variants[variant](c)
    return c


def _mix(c: ml_collections.ConfigDict) -> None:
    """Issue 18's recipe (docs/small_scale.md)."""
    # Issue 18's recipe: the GLUE training text plus the unlabelled text corpora, a
    # SentencePiece vocabulary trained on them (8,000 pieces + 100 sentinels, the model's
    # vocabulary exactly), 64-token inputs, and every second batch a full-sequence
    # denoising batch (compacter_jax.data.denoising) so the decoder reads the encoder.
    c.text_sources = "all"
    c.tokenizer = "train"
    c.tokenizer_vocab_size = 8000
    c.vocab_size = 0
    c.denoise_fraction = 0.5
    c.inputs_length = 64
    c.heldout_fraction = 0.005
    c.batch_size = 32
    # AdamW at 2e-3 sat at the unigram level for 500 steps (loss and encoder swap flat):
    # T5's Adafactor scales each update by the parameter's RMS.
    c.optimizer = "adafactor"
    c.learning_rate = 1e-2
    c.warmup_steps = 100
    c.num_train_steps = 6000
    c.eval_every = 250
    c.save_every = 50
    c.eval_diagnostics = True
    c.export_snapshots = True


def _tiny(c: ml_collections.ConfigDict) -> None:
    """A seconds-long smoke test: t5-tiny sizes, two small tasks."""
    c.tasks = "cb,copa"
    c.model = ml_collections.ConfigDict({
        "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 2,
        "num_layers": 1, "num_decoder_layers": 1,
        "feed_forward_proj": "relu", "tie_word_embeddings": True,
        "scale_decoder_outputs": True, "dropout_rate": 0.0,
    })
    c.inputs_length = 32
    c.heldout_fraction = 0.05
    c.batch_size = 8
    c.learning_rate = 1e-2
    c.warmup_steps = 2
    c.num_train_steps = 12
    c.log_every = 2
    c.eval_every = 6
    c.eval_batch_size = 16
    c.save_every = 4
