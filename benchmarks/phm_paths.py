"""Times the materialised and factored PHM matmul paths (forward + backward) on this machine.

    python -m benchmarks.phm_paths [--tokens 256 4096] [--repeats 3]

Prints one JSON object: per (shape, tokens), the median seconds of each path, the multiply-add
ratio materialised/factored, and which path `phm_matmul(path="auto")` would take. It informs
`compacter_jax.peft.phm.FACTORED_ADVANTAGE`. Takes ~20 s on 2 CPU cores (mostly compilation).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from compacter_jax.peft import phm

# (name, in_features, out_features, n, rank) — the adapter projections of T5-base.
SHAPES = [
    ("compacter_down", 768, 24, 4, 1),
    ("compacter_up", 24, 768, 4, 1),
    ("lphm_down_n12", 768, 24, 12, 1),
    ("lphm_down_r8", 768, 64, 4, 8),
    ("phm_down_n12_full", 768, 24, 12, None),
    ("phm_up_n4_full", 24, 768, 4, None),
]


def _factors(key, k: int, d: int, n: int, rank: int | None):
    ka, kb = jax.random.split(key)
    if rank is None:
        return jax.random.normal(ka, (n, k // n, d // n))
    return (jax.random.normal(ka, (n, k // n, rank)), jax.random.normal(kb, (n, rank, d // n)))


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))        # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure(tokens_list: list[int], repeats: int) -> list[dict]:
    rows = []
    key = jax.random.PRNGKey(0)
    for name, k, d, n, rank in SHAPES:
        rule = jax.random.normal(key, (n, n, n))
        factors = _factors(key, k, d, n, rank)
        for tokens in tokens_list:
            x = jax.random.normal(key, (tokens, k))
            row = {"shape": name, "in": k, "out": d, "n": n, "rank": rank, "tokens": tokens}
            for path in ("materialized", "factored"):
                def loss(x, rule, factors, path=path):
                    return jnp.sum(phm.phm_matmul(x, rule, factors, path=path) ** 2)
                step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                row[f"{path}_s"] = _time(step, x, rule, factors, repeats=repeats)
            costs = phm.path_costs(tokens, k, d, n, rank)
            row["flop_ratio"] = round(costs["materialized"] / costs["factored"], 2)
            row["speedup_factored"] = round(row["materialized_s"] / row["factored_s"], 2)
            row["auto"] = phm.choose_path(tokens, k, d, n, rank)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = measure(args.tokens, args.repeats)
    print(json.dumps({"backend": jax.default_backend(), "results": rows}, indent=1))


if __name__ == "__main__":
    main()
