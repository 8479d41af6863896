"""ATTEMPT (Asai et al. 2022, "Attentional Mixtures of Soft Prompt Tuning"): frozen source
prompts trained by prompt tuning on large tasks, mixed per input with a new target prompt.

For an input with token embeddings X [len, d] (the encoder's input, before the prompt), the
K source prompts P_1..P_K and the target prompt P_t (all [length, d]), as the original code
(`attn_method="sub"`, github.com/AkariAsai/ATTEMPT, `T5Stack.forward`):

    x   = max-pool of X over its tokens                                  [d]
    h   = LayerNorm(W_up SiLU(W_down x))       W_down [d, 100], W_up [100, d], no biases
    k_j = max-pool of P_j over its length, j in 1..K and t               [K+1, d]
    a   = softmax_j(k_j . h / T)               T = d * e (2,087 in T5-base, the configs' value)
    P   = P_t + sum_j a_j P_j                  (the sum runs over the sources *and* P_t)

and P is prepended to X (the mask gets `length` ones in front), as prompt tuning does.
Parameters, under `encoder/prompt/`: `embedding` (P_t), `down`, `up`, `norm` (the attention
module; trained) and `sources` [K, length, d] (frozen, filled by `prepare` from prompt-tuning
exports). T5-base, length 100: 76,800 + 76,800 + 76,800 + 1,536 = 231,936 trained (the paper's
Table 1: 232K per task).

One deviation: the original max-pools over every position of the padded batch, padding
included; here padding is masked out, so an example's prompt does not depend on how far its
batch was padded.

Target prompt inits (the paper's two): "source" copies source prompt `init_source` (the
original's single-task default: the first source), "vocab" copies `length` token-embedding rows
(`vocab_ids`, default a fixed draw from the 5,000 first ids, as the original); also "uniform".

Packed inputs are refused (a prompt per segment would change every row's layout).

Multi-task ATTEMPT (the paper's multi-task setting; `experiments.multitask`): each task has its
own target prompt, the attention module (`down`, `up`, `norm`) is one for every task
(`shared_across_tasks`), the sources are frozen and shared. A task's slice of the bank is a
single-task ATTEMPT tree (the shared attention copied in), so each task's export loads with
`load_adapter` as a single-task adapter. A bank stacked from separate exports (`serve`) is
refused (`bank.check_bankable` without the attention shared).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from compacter_jax.models import T5Config, T5Hooks
from compacter_jax.peft import layer_math
from compacter_jax.peft.method import Method, as_tuple, is_peft_path
from compacter_jax.peft.methods.prompt import validate_vocab_init

Array = jax.Array
INITS = ("source", "vocab", "uniform")
LN_EPS = 1e-5          # torch.nn.LayerNorm's default, which the original uses
ATTENTION = ("down", "up", "norm")  # the attention module's parameters (shared multi-task)
VOCAB_POOL = 5000      # the original samples "vocab" init rows from the first 5,000 ids


# ----------------------------------------------------------------------------- the math
def masked_max_pool(embeds: Array, mask: Array) -> Array:
    """embeds [B, T, D], mask [B, T] (1 = token) -> [B, D]: the max over the kept tokens
    (zeros for a row without any)."""
    keep = jnp.asarray(mask).astype(bool)[..., None]
    low = jnp.finfo(embeds.dtype).min
    pooled = jnp.max(jnp.where(keep, embeds, low), axis=1)
    return jnp.where(keep.any(axis=1), pooled, 0.0)


def attention_weights(query: Array, prompts: Array, temperature: float) -> Array:
    """query [B, D] (the projected pooled input), prompts [P, L, D] -> softmax weights [B, P]
    over the prompts, each keyed by its max-pool over its length."""
    keys = jnp.max(prompts, axis=1)                                       # [P, D]
    return jax.nn.softmax(query @ keys.T / temperature, axis=-1)


def mix_prompts(weights: Array, prompts: Array, target: Array) -> Array:
    """weights [B, P], prompts [P, L, D], target [L, D] -> target + sum_p w_p prompts_p
    [B, L, D]."""
    return target[None] + jnp.einsum("bp,pld->bld", weights, prompts)


# --------------------------------------------------------------------------- the module
class AttemptPrompt(nn.Module):
    """The target prompt, the frozen sources and the attention module; called as
    `(embeds [B, T, D], mask [B, T]) -> ([B, length + T, D], [B, length + T])`. Sows the
    attention weights [B, K + 1] (sources, then target) as `intermediates/attention`."""

    length: int
    d_model: int
    num_sources: int
    attn_dim: int = 100
    temperature: float = 1.0
    init_range: float = 0.5

    @nn.compact
    def __call__(self, embeds: Array, mask: Array) -> tuple[Array, Array]:
        shape = (self.length, self.d_model)
        target = self.param("embedding", layer_math.prompt_initializer("uniform", self.init_range),
                            shape)
        sources = self.param("sources", nn.initializers.zeros, (self.num_sources, *shape))
        # torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as the original.
        torch_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        x = masked_max_pool(embeds.astype(jnp.float32), mask)
        x = nn.Dense(self.attn_dim, use_bias=False, kernel_init=torch_init, name="down")(x)
        x = nn.Dense(self.d_model, use_bias=False, kernel_init=torch_init,
                     name="up")(nn.silu(x))
        query = nn.LayerNorm(epsilon=LN_EPS, name="norm")(x)
        prompts = jnp.concatenate([jax.lax.stop_gradient(sources), target[None]], axis=0)
        weights = attention_weights(query, prompts, self.temperature)
        self.sow("intermediates", "attention", weights)
        mixed = mix_prompts(weights, prompts, target).astype(embeds.dtype)
        ones = jnp.ones((embeds.shape[0], self.length), mask.dtype)
        return jnp.concatenate([mixed, embeds], axis=1), jnp.concatenate([ones, mask], axis=1)


# --------------------------------------------------------------------------- the method
@dataclasses.dataclass(frozen=True)
class AttemptMethod(Method):
    """Attributes:
      sources: export directories of prompt-tuning runs (`save_adapter`, experiments.glue's
        WORKDIR/adapter), one frozen source prompt each; their length must be `length`.
        A comma-separated string is split (`--config.peft.sources=runs/a/adapter,runs/b/adapter`).
      length: prompt tokens (the original: 100).
      attn_dim: the attention module's bottleneck (the original: 100).
      temperature: softmax temperature; None = d_model * e (the original's 2,087 for T5-base).
      init: the target prompt's init, "source" | "vocab" | "uniform" (see the module doc).
      init_source: which source prompt "source" init copies.
      init_range: the uniform init's bound (also the target's value before `prepare`).
      vocab_ids: token ids "vocab" init copies; None = a fixed draw from the first 5,000.
    """

    sources: tuple[str, ...] = ()
    length: int = 100
    attn_dim: int = 100
    temperature: float | None = None
    init: str = "source"
    init_source: int = 0
    init_range: float = 0.5
    vocab_ids: tuple[int, ...] | None = None

    packable: ClassVar[bool] = False
    bankable: ClassVar[bool] = False  # only with the attention shared (`bank.check_bankable`)
    bank_refusal: ClassVar[str] = (
        "multi-task ATTEMPT shares one attention module across the tasks' target prompts, so a "
        "bank must keep it single (shared=peft.bank.shared_paths(method, trainable), as "
        "experiments.multitask does); a bank of separately trained ATTEMPT adapters is not "
        "served: load each with peft.load_adapter")

    def __post_init__(self) -> None:
        super().__post_init__()
        # "a,b" (a comma-separated flag value) is two exports.
        sources = (self.sources,) if isinstance(self.sources, str) else as_tuple(self.sources)
        object.__setattr__(self, "sources", tuple(
            part for s in sources for part in str(s).split(",") if part))
        object.__setattr__(self, "vocab_ids", as_tuple(self.vocab_ids))
        if self.length < 1 or self.attn_dim < 1:
            raise ValueError(f"{self.name}: length and attn_dim must be >= 1, got "
                             f"{self.length}, {self.attn_dim}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0 (None = d_model * e), got "
                             f"{self.temperature}")
        if self.init not in INITS:
            raise ValueError(f"{self.name}: init={self.init!r}; use one of {INITS}")
        if self.sources and not 0 <= self.init_source < len(self.sources):
            raise ValueError(f"{self.name}: init_source={self.init_source} but there are "
                             f"{len(self.sources)} sources")
        if self.vocab_ids is not None and len(self.vocab_ids) != self.length:
            raise ValueError(f"{self.name}: vocab_ids has {len(self.vocab_ids)} ids, length is "
                             f"{self.length}")

    def resolved_temperature(self, d_model: int) -> float:
        return self.temperature if self.temperature is not None else d_model * math.e

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return AttemptHooks(self)

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        return is_peft_path(path) and path[-1] != "sources"

    def shared_across_tasks(self, path: tuple[str, ...]) -> bool:
        # The attention module is one for all tasks; each task has its own target prompt.
        return self.is_trainable(path) and len(path) > 1 and path[-2] in ATTENTION

    def pins_frozen(self, path: tuple[str, ...]) -> bool:
        # The source prompts are read from their exports at every load: an export records
        # their fingerprint with the backbone's, so a re-trained source is refused on reload.
        return is_peft_path(path) and path[-1] == "sources"

    def validate(self, t5: T5Config) -> None:
        validate_vocab_init(self, t5)

    def prepare(self, params: dict, t5: T5Config) -> dict:
        """Loads the frozen source prompts and initialises the target prompt."""
        if not self.sources:
            raise ValueError(f"{self.name}: no source prompts; set sources to export directories "
                             "of prompt_tuning runs (--config.peft.sources=\"('runs/sst2/adapter',"
                             ")\"; see docs/small_scale.md, ATTEMPT)")
        sources = load_source_prompts(self.sources, self.length, t5.d_model)
        prompt = dict(params["encoder"]["prompt"])
        prompt["sources"] = jnp.asarray(sources, prompt["sources"].dtype)
        if self.init == "source":
            prompt["embedding"] = prompt["sources"][self.init_source]
        elif self.init == "vocab":
            ids = (np.asarray(self.vocab_ids) if self.vocab_ids is not None else
                   np.random.default_rng(0).permutation(min(VOCAB_POOL, t5.vocab_size))
                   [:self.length])
            prompt["embedding"] = params["shared"]["embedding"][jnp.asarray(ids)].astype(
                prompt["embedding"].dtype)
        return {**params, "encoder": {**params["encoder"], "prompt": prompt}}


@dataclasses.dataclass(frozen=True)
class AttemptHooks(T5Hooks):
    method: AttemptMethod

    def soft_prompt(self, d_model: int, name: str = "prompt") -> nn.Module | None:
        m = self.method
        return AttemptPrompt(m.length, d_model, len(m.sources), m.attn_dim,
                             m.resolved_temperature(d_model), m.init_range, name=name)


def load_source_prompts(paths: Sequence[str], length: int, d_model: int) -> np.ndarray:
    """[K, length, d_model] float32: the soft prompt `encoder/prompt/embedding` of each
    prompt-tuning export in `paths`. Raises ValueError naming the export that is not one or
    whose prompt has another shape."""
    from compacter_jax.peft.export import load_trainable, method_of_export  # export -> registry
    from compacter_jax.peft.methods.prompt import PromptTuning

    out = []
    for path in paths:
        tree, meta = load_trainable(path)
        method: Any = method_of_export(meta, path)
        if not isinstance(method, PromptTuning):
            raise ValueError(f"ATTEMPT source {path}: an export of {method.name!r} "
                             f"({type(method).__name__}); source prompts come from prompt_tuning "
                             "runs")
        prompt = np.asarray(tree["encoder"]["prompt"]["embedding"], np.float32)
        if prompt.shape != (length, d_model):
            raise ValueError(f"ATTEMPT source {path}: prompt of shape {prompt.shape}, expected "
                             f"(length={length}, d_model={d_model}); set length to the sources'")
        out.append(prompt)
    return np.stack(out)
