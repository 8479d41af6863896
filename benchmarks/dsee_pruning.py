"""DSEE's final-weight pruning (`dsee.merge_and_prune`), measured on a pretrained backbone.

    python -m benchmarks.dsee_pruning [--model checkpoints/t5-mini-glue] [--examples 64]

The DSEE update is zero (as at initialisation), so this measures pruning the pretrained q/v
projections themselves: for each sparsity, the fraction of q/v entries that are zero, the
relative L2 change of the logits and the fraction of top-1 tokens kept, on SST-2 validation
examples with teacher-forced targets. Not a trained DSEE: no task accuracy.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    import jax
    import numpy as np
    from flax import traverse_util

    from compacter_jax import data as data_lib
    from compacter_jax import peft
    from compacter_jax.peft.methods import dsee
    from compacter_jax.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/t5-mini-glue")
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args(argv)
    method = peft.get_method("dsee")
    model, params = peft.from_pretrained(args.model, method, jax.random.PRNGKey(0))
    rows = data_lib.make_source("files").load("sst2", "validation")[:args.examples]
    encoded = data_lib.encode("sst2", rows, load_tokenizer(), max_source_length=64,
                              max_target_length=3)
    b = data_lib.make_batch(encoded, np.arange(len(encoded)))
    logits = jax.jit(lambda p: model.apply(
        {"params": p}, b["input_ids"], b["attention_mask"], b["decoder_input_ids"],
        b["decoder_attention_mask"], deterministic=True))
    real = b["decoder_attention_mask"].astype(bool)
    ref = np.asarray(logits(params))[real]
    for sparsity in (0.0, 0.2, 0.5, 0.8):
        pruned = dsee.merge_and_prune(params, method, sparsity)
        kernels = [np.asarray(v) for k, v in traverse_util.flatten_dict(pruned).items()
                   if k[-2] in method.targets and k[-1] == "kernel"]
        zeros = sum(int((k == 0).sum()) for k in kernels) / sum(k.size for k in kernels)
        out = np.asarray(logits(pruned))[real]
        change = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        kept = float((out.argmax(-1) == ref.argmax(-1)).mean())
        print(f"sparsity {sparsity:.1f}: q/v zeros {zeros:.3f}, logits rel. L2 change "
              f"{change:.4f}, top-1 kept {kept:.3f} ({int(real.sum())} target tokens)")


if __name__ == "__main__":
    main()
