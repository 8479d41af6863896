"""BitFit (Ben Zaken et al. 2021): train bias terms only. T5 has none, so the method adds
zero-initialised biases, as the original Compacter code does:

* `{proj}_delta/bias` beside every projection (q, k, v, o of self- and cross-attention;
  wi | wi_0, wi_1, wo): 202,752 in T5-base;
* `layer_norm_delta/bias` on the output of every block layer norm (12 x 2 + 12 x 3 = 60 in
  T5-base, 46,080; the two final layer norms have none, as in the original);
* `lm_head_delta/bias` [vocab] (32,128 here; the original resizes the vocabulary to 32,100).

280,960 trainable in T5-base (the original's 280,932). In a pre-norm T5 a block norm's output
feeds only the projections right after it, whose biases can absorb a norm bias (b shifts
q by the constant b @ Wq), so `layer_norms=False` (preset "bitfit_projections", 234,880 in
T5-base) trains the same family of functions with fewer parameters; the paper's row is
"bitfit".
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from compacter_jax.models import Site, T5Hooks
from compacter_jax.peft import layers
from compacter_jax.peft.method import Method


@dataclasses.dataclass(frozen=True)
class BitFitMethod(Method):
    """Attributes:
      layer_norms: also a bias on every block layer norm's output (the original).
      lm_head: also a bias on the lm_head's logits (the original trains it).
    """

    layer_norms: bool = True
    lm_head: bool = True

    def hooks(self, dtype: str | None = None) -> T5Hooks:
        return BitFitHooks(self, dtype)


@dataclasses.dataclass(frozen=True)
class BitFitHooks(T5Hooks):
    method: BitFitMethod
    dtype: str | None = None

    def projection_delta(self, site: Site, projection: str, in_features: int,
                         out_features: int, name: str) -> nn.Module | None:
        if projection == "lm_head" and not self.method.lm_head:
            return None
        return layers.BitFitBias(out_features, dtype=self.dtype, name=name)

    def layer_norm_delta(self, site: Site, d_model: int,
                         name: str = "layer_norm_delta") -> nn.Module | None:
        if not self.method.layer_norms:
            return None
        return layers.BitFitBias(d_model, dtype=self.dtype, name=name)
