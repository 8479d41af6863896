"""`torch.randperm(n, generator=torch.Generator().manual_seed(seed))` on CPU, without torch.

The original Compacter code draws its data splits with that call, so matching it bit for bit
is what makes our validation/test halves and low-resource subsamples the paper's rows. What
torch 2.x does on CPU (aten/src/ATen/native/TensorFactories.cpp `randperm_cpu`,
aten/src/ATen/CPUGeneratorImpl.cpp, aten/src/ATen/core/MT19937RNGEngine.h):

* `manual_seed(seed)` takes a Python int in [-2**63, 2**64 - 1] (negative seeds are read as
  their two's complement uint64) and rebuilds a standard MT19937 with `init_genrand` from the
  low 32 bits of the seed; the first draw regenerates the state (numpy's MT19937 does the same
  at `pos == 624`, so its C generator yields torch's 32-bit stream).
* n < UINT32_MAX // 20 = 214_748_364 (`SMALL_N_LIMIT`): forward Fisher-Yates on
  `arange(n)`: for i in 0 .. n-2, `z = random() % (n - i)` with one 32-bit draw, then swap
  positions i and i + z.
* larger n: the "inside-out" shuffle with 64-bit draws, `random64() = (a << 32) | b` of two
  consecutive 32-bit draws a, b: for i in 0 .. n-1, `z = random64() % (i + 1)`, `r[i] = r[z]`,
  `r[z] = i` (on the identity, a swap of positions z and i).

Both shuffles are inherently sequential; instead of a Python loop we compute their result from
the vector of offsets z (see `_forward_fisher_yates` / `_inside_out`): every output slot is
the end of a short chain "who last wrote here", found with one sort and pointer doubling
(n = 100k: ~30 ms, 500k: ~0.15 s; at the switch, n ~ 215M: ~4 min and ~10 GB).
"""

from __future__ import annotations

import operator

import numpy as np

SMALL_N_LIMIT = 0xFFFFFFFF // 20  # torch: n below this uses 32-bit draws and forward Fisher-Yates
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts
_MT_N = 624
_CHUNK = 1 << 22
# The chains sort `position * n + step` in int64, hence n * n < 2**63; beyond this the output
# alone would take more than 24 GB.
MAX_N = 3_037_000_499


def _mt19937_key(seed32: int) -> np.ndarray:
    """MT19937 `init_genrand(seed32)`: the 624-word state, uint32 [624]."""
    key = [seed32]
    for j in range(1, _MT_N):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.asarray(key, dtype=np.uint32)


def mt19937_stream(seed: int, count: int) -> np.ndarray:
    """The first `count` 32-bit outputs of torch's CPU generator after `manual_seed(seed)`.

    Args:
      seed: any int torch accepts (see `torch_randperm`); only its low 32 bits matter.
      count: number of draws (>= 0).

    Returns:
      uint64 [count], each value < 2**32 (uint64 so that the callers' modulo cannot overflow).
    """
    return _seeded_mt19937(seed).random_raw(count).astype(np.uint64, copy=False)


def _seeded_mt19937(seed: int) -> np.random.MT19937:
    """numpy's MT19937 in the state of torch's CPU generator right after `manual_seed(seed)`."""
    bit_generator = np.random.MT19937()
    # pos == 624: the next draw twists the freshly seeded state first, as torch's `left_ = 1`.
    bit_generator.state = {"bit_generator": "MT19937", "state": {
        "key": _mt19937_key(_check_seed(seed) & 0xFFFFFFFF), "pos": _MT_N}}
    return bit_generator


def _previous_hits(targets: np.ndarray, num_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps grouped by the position they write to, in step order (one sort, then O(n)).

    Args:
      targets: int32/int64 [num_steps], targets[k] in [0, num_positions): where step k writes.

    Returns:
      previous: [num_steps] (targets' dtype), the last step k' < k with
        targets[k'] == targets[k], or -1.
      last: [num_positions] (targets' dtype), the last step writing to each position, or -1.
    """
    num_steps = len(targets)
    last = np.full(num_positions, -1, dtype=targets.dtype)
    if num_steps == 0:
        return np.empty(0, dtype=targets.dtype), last
    stride = num_steps
    # Sorting `target * stride + step` orders by target, then step (the keys are unique).
    keys = targets.astype(np.int64) * stride
    keys += np.arange(num_steps, dtype=np.int64)
    keys.sort()
    sorted_steps = (keys % stride).astype(targets.dtype)
    keys //= stride  # now the sorted targets
    same_as_before = keys[1:] == keys[:-1]
    previous = np.full(num_steps, -1, dtype=targets.dtype)
    previous[sorted_steps[1:][same_as_before]] = sorted_steps[:-1][same_as_before]
    is_last = np.append(~same_as_before, True)
    del same_as_before
    last[keys[is_last]] = sorted_steps[is_last]
    return previous, last


def _chain_roots(parent: np.ndarray) -> np.ndarray:
    """Pointer doubling: follows parent links (a forest; roots point to themselves) to roots."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _forward_fisher_yates(offsets: np.ndarray) -> np.ndarray:
    """Result of `for i in range(n-1): swap(r[i], r[i + offsets[i]])` on r = arange(n).

    Args:
      offsets: int32/int64 [n - 1], offsets[i] in [0, n - 1 - i] (n = len(offsets) + 1 >= 1).

    Returns:
      int64 [n].

    Why this equals the loop: step k swaps positions k and t_k = k + offsets[k] >= k, and
    position i is final after step i. Before step s, a position p >= s holds what the last
    step k < s with t_k = p moved there, namely what position k held before step k, or p
    itself if there is no such step. "What position k held before step k" is the same question
    for an earlier step, so it is the root of the chain k -> (last k' < k with t_k' = k).
    """
    n = len(offsets) + 1
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    steps = np.arange(n - 1, dtype=offsets.dtype)
    targets = steps + offsets
    previous, last = _previous_hits(targets, n)
    # The last step before k that wrote to position k (if step k writes to k itself, that is
    # the one before it in k's group).
    parent = np.where(offsets == 0, previous, last[:-1])
    np.copyto(parent, steps, where=parent < 0)
    held_before_own_step = _chain_roots(parent)
    del parent, steps
    # out[i] = what position t_i held before step i; out[n-1] = what n-1 holds at the end.
    hit = np.append(previous, last[n - 1])
    del previous, last
    position = np.append(targets, n - 1)
    del targets
    out = np.where(hit >= 0, held_before_own_step[np.maximum(hit, 0)], position)
    return out.astype(np.int64, copy=False)


def _inside_out(offsets: np.ndarray) -> np.ndarray:
    """Result of `for i in range(n): r[i] = r[offsets[i]]; r[offsets[i]] = i` (inside-out).

    Args:
      offsets: int32/int64 [n], offsets[i] in [0, i].

    Returns:
      int64 [n].

    Why this equals the loop: step i swaps positions z_i = offsets[i] <= i and i, and position
    i holds i until step i. A position p ends with the value k of the last step k > p with
    z_k = p; without one, with what step p put there: what position z_p held before step p,
    which is the last step k in (z_p, p) with z_k = z_p, else (recursively) what step z_p put
    at z_p, ending at a step q with z_q = q (value q).
    """
    n = len(offsets)
    steps = np.arange(n, dtype=offsets.dtype)
    previous, last = _previous_hits(offsets, n)
    # ends_with[q]: the value step q puts at q where the chain ends at q, else -1 (go on to
    # z_q). Steps writing to position c are c itself (if z_c = c) and later ones: "> c" skips c.
    ends_with = np.where(previous > offsets, previous, -1).astype(offsets.dtype, copy=False)
    del previous
    np.copyto(ends_with, steps, where=offsets == steps)
    chain = np.where(ends_with >= 0, steps, offsets)
    put = ends_with[_chain_roots(chain)]
    del ends_with, chain
    out = np.where(last > steps, last, put)
    return out.astype(np.int64, copy=False)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool):
        raise ValueError("seed must be an int, got a bool")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be an int (as torch.Generator.manual_seed takes), "
                         f"got {type(seed).__name__} {seed!r}") from None
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed {seed} is outside torch's seed range [-2**63, 2**64 - 1]")
    return seed


def torch_randperm(n: int, seed: int) -> np.ndarray:
    """`torch.randperm(n, generator=torch.Generator().manual_seed(seed))` (CPU), in numpy.

    Args:
      n: length of the permutation, 0 <= n <= MAX_N.
      seed: int in [-2**63, 2**64 - 1] (torch's range; negative = two's complement).

    Returns:
      int64 [n]: a permutation of 0 .. n-1, element for element equal to torch's.

    Raises:
      ValueError: n or seed is not an int or out of range.
    """
    if isinstance(n, bool):
        raise ValueError("n must be an int, got a bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"n must be an int, got {type(n).__name__} {n!r}") from None
    if not 0 <= n <= MAX_N:
        raise ValueError(f"n must be in [0, {MAX_N}], got {n}")
    seed = _check_seed(seed)
    if n <= 1:
        return np.arange(n, dtype=np.int64)  # torch draws nothing
    # int32 halves the memory of the big intermediate arrays when it can hold every index.
    index_dtype = np.int32 if n <= np.iinfo(np.int32).max else np.int64
    if n < SMALL_N_LIMIT:
        offsets = mt19937_stream(seed, n - 1)
        offsets %= n - np.arange(n - 1, dtype=np.uint64)
        return _forward_fisher_yates(offsets.astype(index_dtype))
    generator = _seeded_mt19937(seed)
    offsets = np.empty(n, dtype=index_dtype)
    for start in range(0, n, _CHUNK):  # chunks: 2n raw draws at once would be 16n bytes
        stop = min(start + _CHUNK, n)
        draws = generator.random_raw(2 * (stop - start)).astype(np.uint64, copy=False)
        random64 = (draws[0::2] << np.uint64(32)) | draws[1::2]
        offsets[start:stop] = random64 % np.arange(start + 1, stop + 1, dtype=np.uint64)
    return _inside_out(offsets)
