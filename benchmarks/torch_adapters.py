"""The PyTorch reference: AdapterHub `adapters` Compacter++ vs full fine-tuning of a
randomly initialised HF T5, measured like `benchmarks.efficiency` (same JSON schema).

Runs in a separate venv (outside the repo; the project venv has transformers 5, which
`adapters` does not support):

    python3.11 -m venv /tmp/adapters-venv
    /tmp/adapters-venv/bin/pip install torch==2.13.0 adapters     # pulls transformers 4.x
    /tmp/adapters-venv/bin/python benchmarks/torch_adapters.py --preset t5-base \
        --methods full,compacter++ --batch 8 --src-len 128 --tgt-len 8 --steps 5 \
        --json benchmarks/results/torch_adapters_t5-base.json

The T5 hyper-parameters come from this project's preset (`compacter_jax.models.config`), read
through the project venv (`--project-python`) when jax is not importable here. Each method
runs in its own subprocess. Train step: forward with dropout + loss, backward, global-norm
clipping 1.0, AdamW over the trainable parameters, `zero_grad(set_to_none=True)`; median
of `--steps` after `--warmup`. Generation: greedy `generate` of exactly tgt-len tokens.
Peak memory: the child's `ru_maxrss`. PyTorch is eager, so compile_time_s is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def preset_hf_dict(preset: str, project_python: str) -> dict:
    code = ("import json; from compacter_jax.models.config import get_preset; "
            f"print(json.dumps(get_preset({preset!r}).to_hf_dict()))")
    try:
        sys.path.insert(0, str(ROOT))
        from compacter_jax.models.config import get_preset  # noqa: F401  (needs jax)
        return get_preset(preset).to_hf_dict()
    except ImportError:
        out = subprocess.run([project_python, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout)


def make_batch(batch: int, src_len: int, tgt_len: int, vocab: int, seed: int = 0):
    """The same random batch as benchmarks.measure.make_batch (same numpy draws)."""
    import numpy as np
    rs = np.random.RandomState(seed)
    labels = rs.randint(2, vocab, size=(batch, tgt_len)).astype(np.int64)
    input_ids = rs.randint(2, vocab, size=(batch, src_len)).astype(np.int64)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int64), labels[:, :-1]], axis=1)
    return input_ids, labels, dec_in


def measure(args, hf: dict, method: str) -> dict:
    import numpy as np
    import torch
    import transformers
    import adapters

    torch.manual_seed(args.seed)
    keep = {k: v for k, v in hf.items() if k not in ("architectures", "model_type",
                                                      "transformers_version")}
    config = transformers.T5Config(**keep)
    model = transformers.T5ForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    if method == "compacter++":
        adapters.init(model)
        kw = {"reduction_factor": args.reduction_factor} if args.reduction_factor else {}
        model.add_adapter("bench", config=adapters.CompacterPlusPlusConfig(**kw))
        model.train_adapter("bench")   # freezes the backbone
        total = sum(p.numel() for p in model.parameters())
    elif method != "full":
        raise ValueError(f"torch_adapters supports full and compacter++, got {method!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=3e-3 if method != "full" else 3e-4, weight_decay=0.0)

    ids, labels, dec_in = (torch.from_numpy(a) for a in make_batch(
        args.batch, args.src_len, args.tgt_len, config.vocab_size, args.seed))
    mask = torch.ones_like(ids)
    dec_mask = torch.ones_like(labels)

    def step():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in,
                    decoder_attention_mask=dec_mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    model.train()
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    for _ in range(args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    gen_times = []
    model.eval()
    with torch.no_grad():
        for i in range(args.gen_repeats + 1):
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tgt_len,
                           min_new_tokens=args.tgt_len, do_sample=False, num_beams=1)
            if i:  # the first call is a warm-up
                gen_times.append(time.perf_counter() - t0)
    step_time, step_cpu = statistics.median(times), statistics.median(cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), "cpu")
    return {
        "method": method, "model": f"random:{args.preset}", "batch": args.batch,
        "src_len": args.src_len, "tgt_len": args.tgt_len, "dtype": "float32",
        "trainable_params": n_trainable, "total_params": total,
        "step_time_s": step_time, "step_times_s": times, "step_cpu_s": step_cpu,
        "examples_per_s": args.batch / step_time,
        "peak_memory_mb": peak, "peak_memory_kind": "host_peak_rss", "host_peak_rss_mb": peak,
        "compile_time_s": 0.0,
        "generation_time_s": statistics.median(gen_times) if gen_times else None,
        "final_loss": loss, "device": f"cpu: {cpu_name} ({os.cpu_count()} cores)",
        "jax_version": None, "framework": "torch+adapters",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "adapters_version": adapters.__version__, "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="t5-base")
    p.add_argument("--methods", default="full,compacter++")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--src-len", type=int, default=128)
    p.add_argument("--tgt-len", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--reduction-factor", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    hf = preset_hf_dict(args.preset, args.project_python)
    if args.child:
        method, out = args.child.split("=", 1)
        Path(out).write_text(json.dumps(measure(args, hf, method)))
        return
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            argv = [a for a in sys.argv[1:]]
            proc = subprocess.run([sys.executable, __file__, *argv, "--child",
                                   f"{method}={out}"], capture_output=True, text=True)
            if proc.returncode or not out.is_file():
                row = {"method": method, "error": proc.stderr.strip().splitlines()[-3:]}
            else:
                row = json.loads(out.read_text())
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_times_s"}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
