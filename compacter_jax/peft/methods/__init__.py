"""Method families, one module each (see `compacter_jax.peft.method.Method`)."""

from compacter_jax.peft.methods.adapter import AdapterHooks, AdapterMethod
from compacter_jax.peft.methods.attempt import AttemptHooks, AttemptMethod
from compacter_jax.peft.methods.bitfit import BitFitHooks, BitFitMethod
from compacter_jax.peft.methods.dsee import DSEEHooks, DSEEMethod
from compacter_jax.peft.methods.full import FullFineTuning
from compacter_jax.peft.methods.intrinsic import IntrinsicSAID
from compacter_jax.peft.methods.lora import LoRAHooks, LoRAMethod
from compacter_jax.peft.methods.lst import LadderSideTuning
from compacter_jax.peft.methods.prompt import PromptHooks, PromptTuning, init_prompt_from_vocab

__all__ = [
    "AdapterHooks", "AdapterMethod", "AttemptHooks", "AttemptMethod", "BitFitHooks",
    "BitFitMethod", "DSEEHooks", "DSEEMethod", "FullFineTuning", "IntrinsicSAID", "LadderSideTuning",
    "LoRAHooks", "LoRAMethod", "PromptHooks", "PromptTuning", "init_prompt_from_vocab",
]
