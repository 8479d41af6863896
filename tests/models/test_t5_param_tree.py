"""The parameter tree of the Flax T5 is a contract: checkpoints (orbax resume), the HF
conversion of `hf_io`, adapter exports and PEFT placements all address leaves by path.

Two references: HF PyTorch's own state dict (every backbone leaf is one of its weights, with
its shape, kernels transposed), and the paths written out below for a T5 with one block per
stack, plain and with the hooks of several PEFT methods (also what the model built before
it was reshaped as t5x's `setup`/`encode`/`decode`)."""

from __future__ import annotations

import flax.traverse_util as traverse_util
import pytest
from t5_reference import make_hf_model

from compacter_jax.models import T5Config, T5ForConditionalGeneration, param_shapes
from compacter_jax.models.hf_io import flax_path_to_hf
from compacter_jax.peft import build_model, get_method

ONE = T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=12, num_layers=1, num_decoder_layers=1,
               num_heads=2, relative_attention_num_buckets=4, relative_attention_max_distance=8)

_ATTENTION = {f"{p}/kernel": (8, 8) for p in "kovq"}
_FF = {"DenseReluDense/wi/kernel": (8, 12), "DenseReluDense/wo/kernel": (12, 8)}


def _sublayer(prefix: str, body: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in {**body, "layer_norm/scale": (8,)}.items()}


# One block per stack, T5 v1.0 (relu, tied): 26 leaves.
BACKBONE = {
    "shared/embedding": (16, 8),
    "encoder/relative_attention_bias/embedding": (4, 2),
    "encoder/final_layer_norm/scale": (8,),
    **_sublayer("encoder/block_0/layer_0", {f"SelfAttention/{k}": v
                                            for k, v in _ATTENTION.items()}),
    **_sublayer("encoder/block_0/layer_1", _FF),
    "decoder/relative_attention_bias/embedding": (4, 2),
    "decoder/final_layer_norm/scale": (8,),
    **_sublayer("decoder/block_0/layer_0", {f"SelfAttention/{k}": v
                                            for k, v in _ATTENTION.items()}),
    **_sublayer("decoder/block_0/layer_1", {f"EncDecAttention/{k}": v
                                            for k, v in _ATTENTION.items()}),
    **_sublayer("decoder/block_0/layer_2", _FF),
}


def _phm_adapter(prefix: str) -> dict:
    return {f"{prefix}/adapter/down/bias": (2,), f"{prefix}/adapter/down/phm_left": (2, 4, 1),
            f"{prefix}/adapter/down/phm_right": (2, 1, 1), f"{prefix}/adapter/up/bias": (8,),
            f"{prefix}/adapter/up/phm_left": (2, 1, 1), f"{prefix}/adapter/up/phm_right": (2, 1, 4)}


def _lora(prefix: str) -> dict:
    return {f"{prefix}/{p}_delta/lora_{ab}": (8, 2) if ab == "a" else (2, 8)
            for p in "qv" for ab in "ab"}


def _side(stack: str, decoder: bool) -> dict:
    """LST's side network at reduction 2: a T5Stack of width 4 with one gated ladder."""
    out = {f"{stack}/first_downsample/bias": (4,), f"{stack}/first_downsample/kernel": (8, 4),
           f"{stack}/stack/final_layer_norm/scale": (4,),
           f"{stack}/stack/relative_attention_bias/embedding": (4, 2),
           f"{stack}/stack/ladder_0/down/bias": (4,),
           f"{stack}/stack/ladder_0/down/kernel": (8, 4), f"{stack}/stack/ladder_0/gate": ()}
    block = f"{stack}/stack/block_0"
    attention = {f"{p}/kernel": (4, 4) for p in "kovq"}
    layers = [{f"SelfAttention/{k}": v for k, v in attention.items()}]
    if decoder:
        layers.append({f"EncDecAttention/{k}": v for k, v in attention.items()})
    layers.append({"DenseReluDense/wi/kernel": (4, 6), "DenseReluDense/wo/kernel": (6, 4)})
    for j, body in enumerate(layers):
        out |= {f"{block}/layer_{j}/{k}": v for k, v in {**body, "layer_norm/scale": (4,)}.items()}
    if decoder:
        out |= {f"{stack}/upsample/bias": (8,), f"{stack}/upsample/kernel": (4, 8)}
    return out


# What each method's hooks add to BACKBONE.
ADDED = {
    "compacter": {"peft_root/phm_rule": (2, 2, 2),
                  **_phm_adapter("encoder/block_0/layer_0"),
                  **_phm_adapter("encoder/block_0/layer_1"),
                  **_phm_adapter("decoder/block_0/layer_0"),
                  **_phm_adapter("decoder/block_0/layer_2")},
    "lora": {**_lora("encoder/block_0/layer_0/SelfAttention"),
             **_lora("decoder/block_0/layer_0/SelfAttention"),
             **_lora("decoder/block_0/layer_1/EncDecAttention")},
    "prompt_tuning": {"encoder/prompt/embedding": (3, 8)},
    "lst": {**_side("side_encoder", False), **_side("side_decoder", True)},
}
METHODS = {"compacter": dict(reduction_factor=4, n=2), "lora": dict(rank=2),
           "prompt_tuning": dict(length=3), "lst": dict(reduction_factor=2, drop_every=0)}


def _shapes(model) -> dict[str, tuple[int, ...]]:
    flat = traverse_util.flatten_dict(param_shapes(model), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def test_backbone_tree_is_the_written_list():
    assert len(BACKBONE) == 26
    assert _shapes(T5ForConditionalGeneration(ONE)) == BACKBONE


def test_scanned_tree_stacks_the_blocks_on_a_leading_axis():
    want = {k.replace("/block_0/", "/blocks/"): (1, *v) if "/block_0/" in k else v
            for k, v in BACKBONE.items()}
    assert _shapes(T5ForConditionalGeneration(ONE.replace(scan_layers=True))) == want


def test_untied_gated_tree_adds_lm_head_and_gated_kernels():
    want = {k: v for k, v in BACKBONE.items() if "DenseReluDense/wi/" not in k}
    for stack, layer in (("encoder", 1), ("decoder", 2)):
        for name in ("wi_0", "wi_1"):
            want[f"{stack}/block_0/layer_{layer}/DenseReluDense/{name}/kernel"] = (8, 12)
    want["lm_head/kernel"] = (8, 16)
    got = _shapes(T5ForConditionalGeneration(
        ONE.replace(feed_forward_proj="gated-gelu", tie_word_embeddings=False)))
    assert got == want


@pytest.mark.parametrize("name", sorted(METHODS))
def test_peft_hooks_add_the_written_leaves(name):
    got = _shapes(build_model(ONE, get_method(name, **METHODS[name])))
    assert got == {**BACKBONE, **ADDED[name]}


@pytest.mark.parametrize("variant", [dict(), dict(feed_forward_proj="gated-gelu",
                                                  tie_word_embeddings=False,
                                                  num_decoder_layers=3)])
def test_backbone_leaves_are_hf_state_dict_weights(variant):
    """Every leaf maps (hf_io) to one HF PyTorch weight of the same shape (kernels transposed),
    and every HF weight but the duplicated embeddings (and a tied lm_head) is a leaf."""
    hf = make_hf_model(seed=0, **variant)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()
            if not k.endswith("embed_tokens.weight")}
    config = T5Config.from_hf_dict(hf.config.to_dict())
    if config.tie_word_embeddings:
        want.pop("lm_head.weight")
    got = {}
    for path, shape in _shapes(T5ForConditionalGeneration(config)).items():
        key, transpose = flax_path_to_hf(tuple(path.split("/")))
        got[key] = shape[::-1] if transpose else shape
    assert got == want
