"""Privacy accounting of DP-SGD / DP-Adam runs with `dp_accounting` (Google's library).

The mechanism of `compacter_jax.train.dp`: each step samples every training example
independently with probability `sampling_rate` (Poisson sampling), sums the per-example
gradients clipped to L2 norm `clip_norm` and adds Gaussian noise of std
`noise_multiplier * clip_norm`. One step is `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`
and a run is that event self-composed `steps` times, under the add-or-remove-one neighbouring
relation (the one Poisson sampling is analysed under). The optimizer only post-processes the
noised sum, so it costs no privacy.

Accountants: "rdp" (Rényi DP, `dp_accounting.rdp.RdpAccountant`, the one of Abadi et al. /
Opacus / TF Privacy; the default) or "pld" (privacy loss distributions,
`dp_accounting.pld.PLDAccountant`: tighter, i.e. a smaller epsilon for the same noise, slower).

    eps = epsilon(noise_multiplier=1.1, sampling_rate=256 / 60_000, steps=10_000, delta=1e-5)
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, sampling_rate=..., steps=..., delta=...)
"""

from __future__ import annotations

import math

import dp_accounting

ACCOUNTANTS = ("rdp", "pld")


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int
                 ) -> dp_accounting.DpEvent:
    """The DpEvent of `steps` Poisson-sampled Gaussian steps."""
    step = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def make_accountant(accountant: str = "rdp") -> dp_accounting.PrivacyAccountant:
    """A fresh `dp_accounting` accountant: "rdp" or "pld" (add-or-remove-one)."""
    if accountant == "rdp":
        return dp_accounting.rdp.RdpAccountant()
    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant()
    raise ValueError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")


def _check(sampling_rate: float, steps: int, delta: float) -> None:
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
    """The epsilon spent after `steps` steps at `delta` (inf when noise_multiplier is 0;
    0 after 0 steps).

    Args:
      noise_multiplier: noise std / clip norm (>= 0).
      sampling_rate: q, the probability that an example is in a step's batch (0 < q <= 1).
      steps: the number of noised updates so far.
      delta: the delta of the (epsilon, delta) guarantee.
      accountant: "rdp" or "pld".
    Returns:
      epsilon, a python float.
    """
    _check(sampling_rate, steps, delta)
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    acct = make_accountant(accountant)
    acct.compose(dp_sgd_event(noise_multiplier, sampling_rate, steps))
    return float(acct.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, sampling_rate: float, steps: int,
                               delta: float, accountant: str = "rdp",
                               tol: float = 1e-3) -> float:
    """The smallest noise multiplier (within `tol`) whose run of `steps` steps spends at most
    `target_epsilon` at `delta` (`dp_accounting.calibrate_dp_mechanism`, Brent's method).

    The result is re-checked: epsilon(result, ...) <= target_epsilon, else ValueError.
    """
    _check(sampling_rate, steps, delta)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon must be a positive finite number, got "
                         f"{target_epsilon}")
    if steps == 0:
        raise ValueError("cannot calibrate noise for a run of 0 steps")
    sigma = float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        lambda s: dp_sgd_event(s, sampling_rate, steps),
        target_epsilon, delta, tol=tol))
    spent = epsilon(sigma, sampling_rate, steps, delta, accountant)
    if not spent <= target_epsilon:
        raise ValueError(f"calibration returned noise multiplier {sigma} spending epsilon "
                         f"{spent} > target {target_epsilon}")
    return sigma
