"""compacter-jax: Compacter (low-rank hypercomplex adapters) and the PEFT baselines of the
paper on a Flax T5.

    import compacter_jax as cj
    model, params = cj.from_pretrained("t5-base", "compacter++")
    method = cj.get_method("compacter++")
    trainable, frozen = method.partition(params)
    step = cj.make_train_step(cj.seq2seq_apply_fn(model), tx, merge_fn=method.combine)

Layers point one way: `models` (the T5, its insertion points) <- `peft` (methods) <- `train`
(generic steps, strategies, checkpoints) <- `experiments`; `data` sits beside `train`.
"""

from compacter_jax.models import (T5Config, T5ForConditionalGeneration, T5Hooks, get_preset,
                                  greedy_generate, save_pretrained, shift_right)
from compacter_jax.peft import (AdapterMethod, BitFitMethod, FullFineTuning, IntrinsicSAID,
                                LoRAMethod, Method, PromptTuning, build_model, count, freezing_optimizer,
                                from_pretrained, get_method, load_adapter, merge, method_names,
                                save_adapter, split)
from compacter_jax.peft import nnx_layers
from compacter_jax.peft.inject import Injection, inject
from compacter_jax.peft import (PathRule, backbone_fingerprint, path_rule,
                                print_trainable_parameters, summary)
from compacter_jax.data.text_batch import make_batch
from compacter_jax.peft.layers import (Adapter, BitFitBias, LoRA, LowRankLinear, PeftRoot,
                                       PHMLinear, SoftPrompt)
from compacter_jax.peft.phm import kronecker_sum, phm_matmul
from compacter_jax.tokenizer import load_tokenizer
from compacter_jax.train import (Checkpointer, TrainState, make_eval_step, make_optimizer,
                                 make_strategy, make_train_step, seq2seq_apply_fn)

__version__ = "0.2.0"

__all__ = [
    # models
    "T5Config", "T5ForConditionalGeneration", "T5Hooks", "get_preset", "greedy_generate",
    "save_pretrained", "shift_right",
    # methods
    "AdapterMethod", "BitFitMethod", "FullFineTuning", "IntrinsicSAID", "LoRAMethod", "Method",
    "PromptTuning",
    "build_model", "from_pretrained", "get_method", "load_adapter", "method_names",
    "save_adapter",
    # trainable / frozen
    "count", "freezing_optimizer", "merge", "split",
    # Flax modules (linen; NNX in `nnx_layers`), injection into any model, and PHM math
    "Injection", "inject", "nnx_layers",
    "Adapter", "BitFitBias", "LoRA", "LowRankLinear", "PHMLinear", "PeftRoot", "SoftPrompt",
    "kronecker_sum", "phm_matmul",
    # training
    "Checkpointer", "TrainState", "make_eval_step", "make_optimizer", "make_strategy",
    "make_train_step", "seq2seq_apply_fn",
    # data
    "load_tokenizer",
    # your own loop: explicit path rules, a per-module summary, batches from texts, the
    # backbone an export records
    "PathRule", "path_rule", "summary", "print_trainable_parameters", "make_batch",
    "backbone_fingerprint",
]
