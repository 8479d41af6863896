"""Full fine-tuning: every backbone parameter is trained (the paper's reference row)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from compacter_jax.peft.method import Method, ParamPath


@dataclasses.dataclass(frozen=True)
class FullFineTuning(Method):
    """No modules inserted; `is_trainable` is True for every parameter (lm_head included)."""

    # The trained parameters are the backbone itself: K tasks cannot share one frozen copy.
    bankable: ClassVar[bool] = False

    def is_trainable(self, path: ParamPath) -> bool:
        return True
