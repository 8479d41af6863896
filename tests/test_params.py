"""The paper's parameter budget (Table 1) on T5-base, from jax.eval_shape (no weights allocated)."""

import json

import pytest

from compacter_jax import params as params_cli
from compacter_jax.models.config import PRESETS
from compacter_jax.peft import get_method

T5_BASE = PRESETS["t5-base"]
BACKBONE = 222_903_552          # 32,128-row embedding (the paper's 222,882,048 has 32,100)

# The paper's Table 1 budget on T5-base: trainable parameters (adapters + the 47,616 layer-norm
# scales for the adapter methods) and the percent the paper prints.
SPEC = {
    "adapter": (1_855_104, 0.832),
    "pfeiffer": (951_360, 0.427),
    "adapterdrop": (1_101_984, 0.494),
    "lowrank": (161_664, 0.073),
    "phm_adapter": (398_976, 0.179),
    "compacter": (161_728, 0.073),
    "compacter++": (104_704, 0.047),
    "prompt_tuning": (76_800, 0.034),
    "prompt_tuning_vocab": (76_800, 0.034),
}


@pytest.mark.parametrize("method", sorted(SPEC))
def test_spec_parameter_counts_on_t5_base(method):
    r = params_cli.report(T5_BASE, get_method(method))
    trainable, percent = SPEC[method]
    assert r.trainable == trainable
    assert r.backbone == BACKBONE and r.total == BACKBONE + r.peft
    assert round(r.percent, 3) == percent
    assert round(100 * trainable / 222_882_048, 3) == percent     # the paper's denominator
    if not method.startswith("prompt_tuning"):
        assert r.peft == trainable - 47_616                        # layer norms are backbone


def test_other_methods_on_t5_base():
    full = params_cli.report(T5_BASE, get_method("full"))
    assert (full.trainable, full.peft, full.percent) == (BACKBONE, 0, 100.0)
    # BitFit: a bias per projection output (q,k,v,o: 768 each; wi 3072, wo 768) + lm_head ...
    per_enc, per_dec = 4 * 768 + 3072 + 768, 8 * 768 + 3072 + 768
    bitfit = params_cli.report(T5_BASE, get_method("bitfit_projections"))
    assert bitfit.trainable == 12 * (per_enc + per_dec) + 32_128 == 234_880
    # ... and, as the original, on the 60 block layer norms: 280,960 (the paper: 280,932 with
    # its 32,100-row lm_head), 0.126 % as printed in Table 1.
    original = params_cli.report(T5_BASE, get_method("bitfit"))
    assert original.trainable == 234_880 + 60 * 768 == 280_960
    assert round(100 * (280_960 - 28) / 222_882_048, 3) == round(original.percent, 3) == 0.126
    # LoRA r=8 on q and v of every self- and cross-attention: 12 * 6 matrices of 2*8*768.
    assert params_cli.report(T5_BASE, get_method("lora")).trainable == 72 * 2 * 8 * 768


def test_cli_json_and_table(capsys, tmp_path):
    assert params_cli.main(["--model", "random:t5-base", "--method", "compacter++", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["methods"][0]["trainable"] == 104_704
    assert out["methods"][0]["backbone"] == BACKBONE
    # A checkpoint directory: only config.json is read.
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["t5-tiny"].to_hf_dict()))
    assert params_cli.main(["--model", str(tmp_path), "--method", "all"]) == 0
    table = capsys.readouterr().out
    assert "prompt_tuning" in table and "% of backbone" in table
    # d_model 64 / 32 = 2 is not divisible by n = 4: reported, not silently skipped.
    assert "compacter++: not applicable to this model" in table


def test_cli_overrides(capsys):
    # Compacter++ at reduction factor 16 on T5-base: bottleneck 48 -> per adapter
    # down 4*192 + 4*12 + 48, up 4*12 + 4*192 + 768, 24 adapters + one rule + layer norms.
    assert params_cli.main(["--method", "compacter++", "--set", "reduction_factor=16",
                            "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["methods"][0]
    assert out["trainable"] == 24 * (864 + 1584) + 64 + 47_616
    assert params_cli.main(["--method", "compacter", "--set", "phm_dim=4"]) == 2
    assert "unknown field(s) ['phm_dim']" in capsys.readouterr().err


def test_cli_errors(capsys):
    assert params_cli.main(["--model", "t5-huge", "--method", "compacter"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert params_cli.main(["--model", "t5-base", "--method", "compactor"]) == 2
    assert "valid names" in capsys.readouterr().err


def test_a_set_value_of_the_wrong_type_exits_2_naming_the_field(capsys):
    for method in ("all", "compacter"):
        assert params_cli.main(["--method", method, "--set", "n=abc"]) == 2
        assert "--set n=abc: field 'n' takes int, not 'abc'" in capsys.readouterr().err



def test_bitfit_with_the_vocabulary_cut_to_the_tokenizer_is_the_papers(capsys):
    """The original resizes T5's embedding to its tokenizer's 32,100 entries before training
    (`--vocab 32100`): BitFit's lm_head bias then has 32,100 entries, the paper's 280,932, and
    the backbone is the paper's denominator 222,882,048 (shapes only; 280,960 and 222,903,552
    on the plain checkpoint: test_other_methods_on_t5_base)."""
    assert params_cli.T5_TOKENIZER_SIZE == 32_100
    assert params_cli.main(["--model", "t5-base", "--method", "bitfit", "--vocab", "32100",
                            "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["methods"][0]
    assert (out["trainable"], out["backbone"]) == (280_932, 222_882_048)
    assert params_cli.PAPER_T5_BASE_DENOMINATOR == 222_882_048
    assert round(out["percent"], 3) == 0.126
    assert params_cli.main(["--model", "t5-base", "--method", "bitfit", "--vocab", "32200"]) == 2
    assert "only cutting" in capsys.readouterr().err


def test_lst_on_t5_base_is_the_papers_budget():
    """LST on T5-base as its authors ran it (scripts/ladder_side_tuning_base.sh: r = 8, side
    blocks 1-3, 5-7, 9-11 in both stacks, biased down/up-projections, learnable gates). The
    LST paper (Sung et al. 2022, Table 1, GLUE with T5-base, "Update Params") reports 1.74 %."""
    r = params_cli.report(T5_BASE, get_method("lst"))
    d, inner, ff = 96, 96, 384                      # 768 / 8, 12 heads x 64 / 8, 3072 / 8
    attn, ln = 4 * d * inner, d
    enc_block, dec_block = attn + ff * d * 2 + 2 * ln, 2 * attn + ff * d * 2 + 3 * ln
    ladder = 768 * d + d                            # a biased down-projection
    side = (9 * (enc_block + dec_block)              # 9 side blocks per stack
            + 2 * (32 * 12 + d)                      # relative attention bias, final norm
            + 2 * 10 * ladder                        # first + 9 ladder down-projections
            + 18                                     # one scalar gate per side block
            + d * 768 + 768)                         # the biased upsample to d_model
    assert r.trainable == r.peft == side == 3_878_706
    assert round(r.percent, 2) == 1.74
    # Every block kept (the paper's ablation without dropping): 5,097,234, 2.29 %.
    all_blocks = params_cli.report(T5_BASE, get_method("lst", drop_every=0))
    assert all_blocks.trainable == side + 3 * (enc_block + dec_block + 2 * ladder + 2)


def test_a_random_model_with_an_unknown_preset_names_the_known(capsys):
    assert params_cli.main(["--model", "random:t5-huge", "--method", "compacter"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 't5-huge'" in err and "'t5-base'" in err and "'t5-tiny'" in err
