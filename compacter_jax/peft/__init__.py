"""PEFT methods for the Flax T5: the `Method` protocol, its families and presets, PHM math and
layers, trainable/frozen partitioning, adapter export.

    model, params = from_pretrained("t5-base", "compacter++")
    method = get_method("compacter++")
    trainable, frozen = method.partition(params)
"""

from compacter_jax.peft.export import (AdapterFileError, backbone_fingerprint, export_trainable,
                                       load_adapter, load_trainable, method_of_export,
                                       save_adapter)
from compacter_jax.peft.legacy import method_from_dict
from compacter_jax.peft.method import Method, is_layer_norm_path, is_peft_path
from compacter_jax.peft.methods import (AdapterMethod, BitFitMethod, FullFineTuning,
                                        IntrinsicSAID, LoRAMethod, PromptTuning,
                                        init_prompt_from_vocab)
from compacter_jax.peft.model import build_model, from_pretrained
from compacter_jax.peft.partition import (FROZEN, TRAINABLE, PathRule, count,
                                          freezing_optimizer, label_params, merge, path_rule,
                                          split, trainable_count)
from compacter_jax.peft.registry import PRESETS, cli_fields, get_method, method_names
from compacter_jax.peft.summary import count_by_module, print_trainable_parameters, summary

__all__ = [
    "FROZEN", "PRESETS", "TRAINABLE", "AdapterFileError", "AdapterMethod", "BitFitMethod",
    "FullFineTuning", "IntrinsicSAID", "LoRAMethod", "Method", "PromptTuning", "build_model", "cli_fields",
    "count", "export_trainable", "freezing_optimizer", "from_pretrained", "get_method",
    "init_prompt_from_vocab", "is_layer_norm_path", "is_peft_path", "label_params",
    "load_adapter", "load_trainable", "merge", "method_from_dict", "method_names",
    "method_of_export", "save_adapter", "split", "trainable_count",
    "PathRule", "path_rule", "backbone_fingerprint", "count_by_module",
    "print_trainable_parameters", "summary",
]
