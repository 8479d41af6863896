"""`T5Config`: the T5 hyper-parameters (HF `config.json` compatible) plus runtime options.

Tying and output scaling are two separate flags, because transformers >= 5 forces
`tie_word_embeddings: true` in every T5 config it writes and keeps the original meaning in
`scale_decoder_outputs` (see docs/DESIGN.md, "Checkpoints"):

* T5 v1.0: tied lm_head, decoder output scaled by d_model**-0.5 before it.
* T5 v1.1 / FLAN-T5: separate `lm_head`, no scaling.
* transformers-5 fresh "v1.1-like" models: tied, not scaled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import jax.numpy as jnp

from compacter_jax.hub import HUB_IDS  # noqa: F401  (re-exported: the Hub ids of short names)
from compacter_jax.paths import locate

FeedForwardProj = Literal["relu", "gated-gelu"]
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FF_PROJS = ("relu", "gated-gelu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """T5 architecture + runtime options (frozen, hashable: usable as a static jit argument).

    Runtime options (not part of HF config.json): `dtype` is the compute dtype ("float32" or
    "bfloat16"; softmax, layer norm and logits stay float32), `param_dtype` the storage dtype,
    `remat` wraps each block in `nn.remat`, `scan_layers` runs the blocks with `nn.scan`
    (params stacked under `{encoder,decoder}/blocks` with a leading layer axis).
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: FeedForwardProj = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # runtime options
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in _FF_PROJS:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"use one of {_FF_PROJS} (T5 v1.0: 'relu', v1.1/FLAN: 'gated-gelu')"
            )
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(
                    f"T5Config.{field}={getattr(self, field)!r}; use one of {sorted(_DTYPES)}"
                )
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers",
                      "num_decoder_layers", "num_heads", "relative_attention_num_buckets",
                      "relative_attention_max_distance"):
            if int(getattr(self, field)) <= 0:
                raise ValueError(f"T5Config.{field} must be positive, got {getattr(self, field)}")

    # -- derived -----------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> Any:
        """The jnp dtype of activations and matmuls."""
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self) -> Any:
        """The jnp dtype parameters are created/stored in."""
        return _DTYPES[self.param_dtype]

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)

    # -- HF config.json ----------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **runtime: Any) -> "T5Config":
        """Builds a config from a HF T5 `config.json` dict; `runtime` sets dtype/remat/... .

        Missing `scale_decoder_outputs` (transformers < 5 files) means "scaled iff tied".
        Raises ValueError naming the field for unsupported values or wrong types (a
        non-object document, `"num_layers": "two"`, ...).
        """
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object of T5 settings, got a "
                             f"JSON {_json_kind(d)}")
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ValueError(f"config.json model_type={model_type!r}: only T5 models are supported")
        if not _hf_bool(d, "is_encoder_decoder", True):
            raise ValueError("config.json is_encoder_decoder=false: only the encoder-decoder T5 "
                             "(T5ForConditionalGeneration) is supported")
        if _hf_bool(d, "is_decoder", False):
            raise ValueError("config.json is_decoder=true: only the encoder-decoder T5 is "
                             "supported")
        ff = d.get("feed_forward_proj", "relu")
        if ff not in _FF_PROJS:
            raise ValueError(f"config.json feed_forward_proj={ff!r} is not supported; "
                             f"supported: {_FF_PROJS}")
        tie = _hf_bool(d, "tie_word_embeddings", True)
        scale = _hf_bool(d, "scale_decoder_outputs", tie)
        if isinstance(d.get("eos_token_id"), (list, tuple)) and d["eos_token_id"]:
            d = {**d, "eos_token_id": d["eos_token_id"][0]}
        pad = _hf_int(d, "pad_token_id", 0)
        num_layers = _hf_int(d, "num_layers", 6)
        kwargs = dict(
            vocab_size=_hf_int(d, "vocab_size", 32128),
            d_model=_hf_int(d, "d_model", 512),
            d_kv=_hf_int(d, "d_kv", 64),
            d_ff=_hf_int(d, "d_ff", 2048),
            num_layers=num_layers,
            num_decoder_layers=_hf_int(d, "num_decoder_layers", num_layers),
            num_heads=_hf_int(d, "num_heads", 8),
            relative_attention_num_buckets=_hf_int(d, "relative_attention_num_buckets", 32),
            relative_attention_max_distance=_hf_int(d, "relative_attention_max_distance", 128),
            dropout_rate=_hf_float(d, "dropout_rate", 0.1),
            layer_norm_epsilon=_hf_float(d, "layer_norm_epsilon", 1e-6),
            feed_forward_proj=ff,
            tie_word_embeddings=tie,
            scale_decoder_outputs=scale,
            pad_token_id=pad,
            eos_token_id=_hf_int(d, "eos_token_id", 1),
            decoder_start_token_id=_hf_int(d, "decoder_start_token_id", pad),
        )
        check_sizes(kwargs)
        kwargs.update(runtime)
        try:
            return cls(**kwargs)
        except ValueError as e:  # "T5Config.num_heads must be positive" -> name the file's field
            raise ValueError(f"config.json: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` dict (loadable by transformers 4.x and 5.x)."""
        gated = self.is_gated
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "is_encoder_decoder": True,
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "dropout_rate": self.dropout_rate,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_factor": 1.0,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": "gelu_new" if gated else "relu",
            "is_gated_act": gated,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "use_cache": True,
        }


# Upper bounds on what a config.json may ask for. A downloaded repo is untrusted input: a
# hostile num_layers=10**6 would hang the loader while it traces the blocks, a vocab_size of
# 10**12 overflow inside JAX. The largest public T5s stay far below (t5-11b: d_ff 65,536, 128
# heads, d_kv 128; mT5: 250,112 vocabulary entries; UL2: 32 layers, 20B parameters).
MAX_SIZES: dict[str, int] = {
    "vocab_size": 1 << 20, "d_model": 1 << 15, "d_kv": 1 << 13, "d_ff": 1 << 18,
    "num_layers": 256, "num_decoder_layers": 256, "num_heads": 1024,
    "relative_attention_num_buckets": 1 << 12, "relative_attention_max_distance": 1 << 20,
}
MAX_PARAMS = 10**11


def backbone_param_count(sizes: "T5Config | dict[str, Any]") -> int:
    """Number of T5 backbone weights the sizes describe (embedding, blocks, relative attention
    biases, final norms, and lm_head when untied), as stored in a HF checkpoint."""
    get = sizes.get if isinstance(sizes, dict) else (lambda k: getattr(sizes, k))
    d, inner, ff = get("d_model"), get("num_heads") * get("d_kv"), get("d_ff")
    ff_mats = 3 if get("feed_forward_proj") == "gated-gelu" else 2
    attention, mlp = 4 * d * inner, ff_mats * d * ff
    encoder = get("num_layers") * (attention + mlp + 2 * d) + d
    decoder = get("num_decoder_layers") * (2 * attention + mlp + 3 * d) + d
    biases = 2 * get("relative_attention_num_buckets") * get("num_heads")
    embeddings = get("vocab_size") * d * (1 if get("tie_word_embeddings") else 2)
    return embeddings + encoder + decoder + biases


def check_sizes(sizes: dict[str, Any]) -> None:
    """Raises ValueError naming the config.json field whose value is out of `MAX_SIZES`, or
    the fields when together they describe more than `MAX_PARAMS` weights."""
    for field, limit in MAX_SIZES.items():
        value = sizes.get(field)
        if value is not None and value > limit:
            raise ValueError(f"config.json field {field!r} is {value:,}, above the limit "
                             f"{limit:,} (a corrupt or hostile file? no public T5 comes close)")
    total = backbone_param_count(sizes)
    if total > MAX_PARAMS:
        fields = ", ".join(f"{k}={sizes[k]}" for k in ("vocab_size", "d_model", "d_ff",
                                                      "num_layers", "num_decoder_layers"))
        raise ValueError(f"config.json describes {total:,} parameters ({fields}), more than "
                         f"the {MAX_PARAMS:,} of any supported T5")


def _json_kind(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _hf_int(d: dict[str, Any], key: str, default: int) -> int:
    """`d[key]` as an int (`default` when absent or null); an integral float is accepted."""
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError(f"config.json field {key!r} must be an integer, got {value!r} "
                         f"(a JSON {_json_kind(value)})")
    return int(value)


def _hf_float(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json field {key!r} must be a number, got {value!r} "
                         f"(a JSON {_json_kind(value)})")
    return float(value)


def _hf_bool(d: dict[str, Any], key: str, default: bool) -> bool:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json field {key!r} must be true or false, got {value!r}")
    return value


def _v10(d_model: int, d_ff: int, layers: int, heads: int) -> T5Config:
    return T5Config(d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, feed_forward_proj="relu",
                    tie_word_embeddings=True, scale_decoder_outputs=True)


def _v11(d_model: int, d_ff: int, layers: int, heads: int) -> T5Config:
    return T5Config(d_model=d_model, d_kv=64, d_ff=d_ff, num_layers=layers,
                    num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False, scale_decoder_outputs=False)


# Hyper-parameters of the public HF checkpoints (all with the 32,128-row embedding).
PRESETS: dict[str, T5Config] = {
    "t5-tiny": T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                        num_heads=2, feed_forward_proj="relu", tie_word_embeddings=True,
                        scale_decoder_outputs=True),
    "t5-small": _v10(512, 2048, 6, 8),
    "t5-base": _v10(768, 3072, 12, 12),
    "t5-large": _v10(1024, 4096, 24, 16),
    "t5-v1_1-small": _v11(512, 1024, 8, 6),
    "t5-v1_1-base": _v11(768, 2048, 12, 12),
    "flan-t5-small": _v11(512, 1024, 8, 6),
    "flan-t5-base": _v11(768, 2048, 12, 12),
}


RANDOM_PREFIX = "random:"


class ModelSpec(NamedTuple):
    """What a model name means: `kind` "random" (`where` = the preset name), "path" or
    "shipped" (`where` = the folder, a Path) or "hub" (`where` = the Hub id or short name)."""

    kind: str
    where: Any


def is_random(name: str) -> bool:
    """Whether `name` is a `random:<preset>` backbone (randomly initialised weights)."""
    return str(name).startswith(RANDOM_PREFIX)


def parse_model_spec(name: str) -> ModelSpec:
    """The one parser of model names (`--config.model`, `--backbone`, `--model`, exports'
    `model`): `random:<preset>`, a local folder, a backbone shipped with the package
    (`t5-mini-glue`) or a Hub id. Touches no network (a Hub id is not checked here).

    Raises:
      ValueError for `random:` with an unknown preset, naming the valid ones.
    """
    if is_random(name):
        preset = name[len(RANDOM_PREFIX):]
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} in {name!r}; known: {sorted(PRESETS)} "
                             f"(e.g. {RANDOM_PREFIX}t5-tiny)")
        return ModelSpec("random", preset)
    return ModelSpec(*locate(name))


def get_preset(name: str, **runtime: Any) -> T5Config:
    """The preset `name` with runtime options (dtype, remat, scan_layers, ...) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**runtime)
