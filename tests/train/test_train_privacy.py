"""Privacy accounting: epsilon equals dp-accounting's for the same (noise, rate, steps, delta),
computed here directly; calibrated noise never exceeds the target; bad values are refused."""

import math

import dp_accounting
import pytest

from compacter_jax.train import privacy


def direct_epsilon(sigma, q, steps, delta, accountant):
    acct = (dp_accounting.rdp.RdpAccountant() if accountant == "rdp"
            else dp_accounting.pld.PLDAccountant())
    for _ in range(3):  # composed one event at a time, not as one self-composed event
        acct.compose(dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(sigma)), steps // 3)
    return acct.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_equals_dp_accounting(accountant):
    sigma, q, steps, delta = 1.1, 256 / 60_000, 120, 1e-5
    got = privacy.epsilon(sigma, q, steps, delta, accountant)
    assert got == pytest.approx(direct_epsilon(sigma, q, steps, delta, accountant), rel=1e-6)
    # More steps or less noise spend more; PLD is at least as tight as RDP.
    assert privacy.epsilon(sigma, q, 2 * steps, delta, accountant) > got
    assert privacy.epsilon(0.9, q, steps, delta, accountant) > got
    assert privacy.epsilon(sigma, q, 0, delta, accountant) == 0.0
    assert math.isinf(privacy.epsilon(0.0, q, steps, delta, accountant))


def test_pld_is_tighter_than_rdp():
    args = (1.0, 0.01, 30, 1e-5)
    assert privacy.epsilon(*args, "pld") < privacy.epsilon(*args, "rdp")


@pytest.mark.parametrize("target,accountant", [
    (3.0, "rdp"), (8.0, "rdp"),
    pytest.param(3.0, "pld", marks=pytest.mark.long)])  # PLD calibration: ~5 s idle
def test_calibrated_noise_never_exceeds_the_target(target, accountant):
    q, steps, delta = 100 / 66_349, 2000, 1e-5
    sigma = privacy.calibrate_noise_multiplier(target, q, steps, delta, accountant)
    spent = [privacy.epsilon(sigma, q, s, delta, accountant) for s in (1, steps // 2, steps)]
    assert spent == sorted(spent) and spent[-1] <= target  # every step of the run within it
    # and not wastefully: 2% less noise would exceed the target
    assert privacy.epsilon(0.98 * sigma, q, steps, delta, accountant) > target


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="sampling_rate"):
        privacy.epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        privacy.epsilon(1.0, 0.1, 10, 0.0)
    with pytest.raises(ValueError, match="unknown accountant"):
        privacy.epsilon(1.0, 0.1, 10, 1e-5, "moments")
    with pytest.raises(ValueError, match="target epsilon"):
        privacy.calibrate_noise_multiplier(-1.0, 0.1, 10, 1e-5)
