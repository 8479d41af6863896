"""Full fine-tuning: every backbone parameter is trained (the paper's reference row)."""

from __future__ import annotations

import dataclasses

from compacter_jax.peft.method import Method, ParamPath


@dataclasses.dataclass(frozen=True)
class FullFineTuning(Method):
    """No modules inserted; `is_trainable` is True for every parameter (lm_head included)."""

    def is_trainable(self, path: ParamPath) -> bool:
        return True
