"""Token fill of packed training batches on a real task, fixed vs tight target lengths.

    python -m benchmarks.packing_fill --task sst2 [--batch 32] [--epochs 3]

Every batch of the recipe (`train_batches`, seed 42, the paper's training split, T5
tokenizer) is packed with `plan_packing(..., tight_targets=False)` and with the default
tight targets; prints the plans, source and target fill, and the compiled shapes
([rows, target length] -> batches). Host-side only (no model): seconds to a minute.
"""

from __future__ import annotations

import argparse
import collections

from benchmarks.throughput import encode_train_split, paper_epochs


def main(argv: list[str] | None = None) -> None:
    from compacter_jax.data import packing, train_batches
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=None, help="default: the paper's")
    args = ap.parse_args(argv)
    epochs = args.epochs or paper_epochs(args.task)
    encoded = encode_train_split(args.task, add_prefix=False)
    for tight in (False, True):
        plan = packing.plan_packing(encoded, args.batch, seed=42, num_epochs=epochs,
                                    tight_targets=tight)
        total, shapes = collections.Counter(), collections.Counter()
        for batch, _ in train_batches(encoded, args.batch, seed=42, num_epochs=epochs):
            packed = plan.pack(batch)
            total.update(packing.fill(packed))
            shapes[packed["input_ids"].shape[0], packed["labels"].shape[1]] += 1
        print(f"{'tight' if tight else 'fixed'}: {plan}")
        print(f"  source_fill {total['source_tokens'] / total['source_slots']:.3f}  "
              f"target_fill {total['target_tokens'] / total['target_slots']:.3f}  "
              f"{sum(shapes.values())} batches, {len(shapes)} shapes: {sorted(shapes.items())}")


if __name__ == "__main__":
    main()
