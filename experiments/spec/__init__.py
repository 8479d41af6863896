"""What a run's config may hold, checked once, up front, before any corpus, backbone or compiled
program: a field the run does not know (naming the valid ones), a missing field, and a value it
cannot use are each one `ConfigError` naming `--config.<field>`, the value and the fix (the CLIs
exit 2 on it). Configs are data (`experiments/configs/*.py`); their schema is here.

    check_fields(config, glue_defaults())        # every run: unknown / missing fields
    spec = pretrain_spec(config)                 # pretraining: checked, sentinels resolved

Fine-tuning and multi-task values are checked by `validate_config` (after `check_fields`),
and `finetune_spec` resolves their sentinels; pretraining's by `pretrain_spec`. Both return
the values typed, every sentinel (`-1` / `""` / `0` / None meaning "unset") resolved.

`fields.py`: the field checks and the value checkers every spec is written with;
`finetune.py`: fine-tuning and multi-task (`validate_config`, `FineTuneSpec`); `pretrain.py`:
pretraining (`PretrainSpec`, model sizes bounded by `MAX_SIZES` and the device's memory).
"""

from experiments.spec.fields import (ConfigError, check_fields, flag, glue_defaults,
                                     multitask_defaults, pretrain_defaults, unknown_fields,
                                     unknown_override)
from experiments.spec.finetune import (DTYPES, STRATEGIES, FineTuneSpec, check_model_config,
                                       dp_enabled, finetune_spec, unset_below_one,
                                       validate_config)
from experiments.spec.pretrain import (MODEL_FIELDS, PretrainSpec, check_model_sizes,
                                       pretrain_spec)

__all__ = [
    "ConfigError", "DTYPES", "FineTuneSpec", "MODEL_FIELDS", "PretrainSpec", "STRATEGIES",
    "check_fields", "check_model_config", "check_model_sizes", "dp_enabled", "finetune_spec",
    "flag", "glue_defaults", "multitask_defaults", "pretrain_defaults", "pretrain_spec",
    "unknown_fields", "unknown_override", "unset_below_one", "validate_config",
]
