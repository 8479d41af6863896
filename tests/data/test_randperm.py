"""torch_randperm against real torch.randperm (CPU), the MT19937 reference outputs, and the
vectorised shuffles against the plain loops of torch's randperm_cpu."""

import os

import numpy as np
import pytest

from compacter_jax.data import randperm as rp
from compacter_jax.data.randperm import mt19937_stream, torch_randperm

torch = pytest.importorskip("torch")

SEEDS = (0, 1, 42, 1234, 2**31 - 1, 2**32 + 7, 2**63 + 12345, 2**64 - 1, -(2**63), -1)
# 624 / 1248: where MT19937 regenerates its state (draw 624 is the first of the second block).
SIZES = (0, 1, 2, 3, 4, 5, 10, 100, 277, 623, 624, 625, 626, 1247, 1248, 1249, 1250, 3000,
         67_349, 104_743, 392_702)


def _torch_randperm(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def _torch_random64(count, seed):
    """torch's `random64()` stream: a full-range int64 `random_` returns it unchanged."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(count, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    return out.numpy().view(np.uint64)


def test_mt19937_matches_the_reference_generator():
    # Independent of torch: MT19937 seeded 5489 (init_genrand) starts 3499211612, and its
    # 10000th output is 4123659995 (the value C++ requires of std::mt19937, [rand.predef]).
    stream = mt19937_stream(5489, 10_000)
    assert stream.dtype == np.uint64
    assert int(stream[0]) == 3499211612 and int(stream[-1]) == 4123659995


@pytest.mark.parametrize("seed", [0, 42, 2**32 + 7, -1])
def test_mt19937_pairs_are_torchs_random64(seed):
    draws = mt19937_stream(seed, 2 * 1300)  # crosses two state regenerations
    random64 = (draws[0::2] << np.uint64(32)) | draws[1::2]  # first draw = high word
    np.testing.assert_array_equal(random64, _torch_random64(1300, seed))


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_torch_randperm(seed):
    for n in SIZES:
        ours = torch_randperm(n, seed)
        assert ours.dtype == np.int64 and ours.shape == (n,)
        np.testing.assert_array_equal(ours, _torch_randperm(n, seed), err_msg=f"n={n}")


@pytest.mark.parametrize("seed", [0, 42])
def test_matches_torch_randperm_for_every_small_n(seed):
    for n in range(0, 700):
        np.testing.assert_array_equal(torch_randperm(n, seed), _torch_randperm(n, seed),
                                      err_msg=f"n={n}")


def test_seed_only_uses_its_low_32_bits_like_torch():
    np.testing.assert_array_equal(torch_randperm(50, 2**32 + 5), torch_randperm(50, 5))
    np.testing.assert_array_equal(torch_randperm(50, -1), torch_randperm(50, 2**32 - 1))
    assert not np.array_equal(torch_randperm(50, 5), torch_randperm(50, 6))
    np.testing.assert_array_equal(torch_randperm(20, np.int64(7)), _torch_randperm(20, 7))


def _forward_loop(offsets):
    """torch's randperm_cpu for n < SMALL_N_LIMIT, with the draws reduced to offsets."""
    r = list(range(len(offsets) + 1))
    for i, z in enumerate(offsets.tolist()):
        r[i], r[i + z] = r[i + z], r[i]
    return r


def _inside_out_loop(offsets):
    """torch's randperm_cpu for n >= SMALL_N_LIMIT, with the draws reduced to offsets."""
    r = [0] * len(offsets)
    for i, z in enumerate(offsets.tolist()):
        r[i] = i
        r[i] = r[z]
        r[z] = i
    return r


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_vectorised_shuffles_equal_the_loops(dtype):
    rng = np.random.default_rng(0)
    for n in list(range(1, 80)) + [500, 2000]:
        high = np.arange(n - 1, 0, -1)  # forward: offsets[i] in [0, n-1-i]
        cases = [rng.integers(0, high + 1), np.zeros(n - 1, np.int64), high]
        for offsets in cases:
            offsets = np.asarray(offsets, dtype=dtype)
            got = rp._forward_fisher_yates(offsets)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, _forward_loop(offsets), err_msg=f"n={n}")
        high = np.arange(n)  # inside-out: offsets[i] in [0, i]
        cases = [rng.integers(0, high + 1), np.zeros(n, np.int64), high,
                 rng.integers(0, np.minimum(high, 3) + 1)]  # few targets: long chains
        for offsets in cases:
            offsets = np.asarray(offsets, dtype=dtype)
            np.testing.assert_array_equal(rp._inside_out(offsets), _inside_out_loop(offsets),
                                          err_msg=f"n={n}")
    assert rp._inside_out(np.zeros(0, dtype)).shape == (0,)
    np.testing.assert_array_equal(rp._forward_fisher_yates(np.zeros(0, dtype)), [0])


@pytest.mark.parametrize("seed", [0, 42, 2**63 + 12345])
def test_large_n_branch_equals_torchs_algorithm_on_torchs_draws(monkeypatch, seed):
    # torch takes this branch only from n = 214,748,364; lower the switch here and check our
    # 64-bit path (draw pairing, modulo, chunking, shuffle) on torch's own random64 stream.
    monkeypatch.setattr(rp, "SMALL_N_LIMIT", 0)
    monkeypatch.setattr(rp, "_CHUNK", 7)
    for n in (2, 3, 10, 624, 1000):
        draws = _torch_random64(n, seed)
        offsets = (draws % np.arange(1, n + 1, dtype=np.uint64)).astype(np.int64)
        np.testing.assert_array_equal(torch_randperm(n, seed), _inside_out_loop(offsets))


@pytest.mark.skipif(os.environ.get("COMPACTER_HUGE_RANDPERM") != "1",
                    reason="needs ~12 GB and ~8 min; set COMPACTER_HUGE_RANDPERM=1 to run")
@pytest.mark.parametrize("n", [rp.SMALL_N_LIMIT - 1, rp.SMALL_N_LIMIT])
def test_matches_torch_at_the_algorithm_switch(n):
    generator = torch.Generator().manual_seed(42)
    expected = torch.randperm(n, generator=generator).numpy()
    # The draw after randperm tells how many torch consumed: n-1 (32-bit) or 2n (64-bit).
    following = torch.empty(1, dtype=torch.int64).random_(-(2**63), None, generator=generator)
    used = n - 1 if n < rp.SMALL_N_LIMIT else 2 * n
    bit_generator = rp._seeded_mt19937(42)
    for start in range(0, used, 1 << 24):
        bit_generator.random_raw(min(1 << 24, used - start))
    hi, lo = bit_generator.random_raw(2).astype(np.uint64)
    assert (hi << np.uint64(32)) | lo == following.numpy().view(np.uint64)[0]
    got = torch_randperm(n, 42)
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("n", [-1, 1.5, True, "3", rp.MAX_N + 1])
def test_bad_n_raises(n):
    with pytest.raises(ValueError, match="n must be"):
        torch_randperm(n, 0)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.0, True, "42", None])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        torch_randperm(5, seed)


def test_seed_range_is_torchs():
    for seed in (2**64 - 1, -(2**63)):  # both ends accepted by torch and by us
        np.testing.assert_array_equal(torch_randperm(9, seed), _torch_randperm(9, seed))
    for seed in (2**64, -(2**63) - 1):  # just outside: both refuse
        with pytest.raises((ValueError, RuntimeError, OverflowError)):
            torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match="outside torch's seed range"):
            torch_randperm(9, seed)

