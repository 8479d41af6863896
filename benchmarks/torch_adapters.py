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

Real-data mode (`--task sst2[,rte]`, the PyTorch side of `benchmarks.throughput`): the same
rows in the same order as ours. The project venv exports the recipe's padded batches
(`python -m benchmarks.throughput --export-batches`: paper train split, T5 vocabulary, source
length 128, the task's target length and task prefix, `train_batches` seed 42), and each
(method, padding) runs in its own subprocess on them:

    /tmp/adapters-venv/bin/pip install torch==2.13.0 adapters sentencepiece
    /tmp/adapters-venv/bin/python benchmarks/torch_adapters.py --task sst2 --preset t5-base \
        --methods full,compacter++ --padding dynamic,max_length --batch 32 --steps 10 \
        --json benchmarks/results/torch_adapters_real_sst2.json

`--padding dynamic`: HF `DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)` (pads to
the batch's longest source and target; what the original trains with, as it leaves
`pad_to_max_length` off); `max_length`: sources padded to 128 and labels to the task's target
length with -100, the original's `pad_to_max_length=True` + `default_data_collator`. An
epoch's last batch is partial in both (HF's loader does not drop it). Batches
are collated before the timed steps (`host_batch_s`); the model builds `decoder_input_ids`
from the labels, as in the original. The rows carry the fields of `benchmarks.throughput`
(`examples_per_s`, `step_time_s`, `source_fill`, `target_fill`, `real_model_flops_per_step`,
...); `--device cuda --dtype bfloat16` (autocast) for a GPU.
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


def _collate(arrays: dict, i: int, padding: str, tokenizer) -> dict:
    """Torch batch `i` of the exported arrays: input_ids, attention_mask, labels (-100 on
    padding), by the given padding rule (see the module docstring)."""
    import numpy as np
    import torch
    from transformers import DataCollatorForSeq2Seq

    n = int(arrays["num_examples"][i])  # a partial last batch stays partial, as HF's loader
    ids, mask = arrays["input_ids"][i][:n], arrays["attention_mask"][i][:n]
    labels, label_mask = arrays["labels"][i][:n], arrays["decoder_attention_mask"][i][:n]
    if padding == "max_length":
        return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
                "attention_mask": torch.from_numpy(mask.astype(np.int64)),
                "labels": torch.from_numpy(np.where(label_mask == 1, labels, -100)
                                           .astype(np.int64))}
    features = [{"input_ids": row[:s].tolist(), "attention_mask": [1] * int(s),
                 "labels": lab[:t].tolist()}
                for row, s, lab, t in zip(ids, mask.sum(1), labels, label_mask.sum(1))]
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    return dict(collator(features))


def measure_real(args, hf: dict, method: str, padding: str, batches: str) -> dict:
    """One real-data run (module docstring) on the exported batches in `batches` (.npz)."""
    import numpy as np
    import torch
    import transformers
    import adapters

    load_average = os.getloadavg()[0]  # before this run loads the machine itself
    data = np.load(batches)
    meta = json.loads(str(data["meta"]))
    arrays = {k: data[k] for k in data.files if k != "meta"}
    tokenizer = transformers.T5Tokenizer.from_pretrained(meta["vocab_dir"])
    if len(tokenizer) < 1000 or tokenizer.pad_token_id != 0 or tokenizer.padding_side != "right":
        raise ValueError(f"{meta['vocab_dir']}: expected the real T5 vocabulary (pad id 0, "
                         f"right padding), got {len(tokenizer)} entries")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    keep = {k: v for k, v in hf.items() if k not in ("architectures", "model_type",
                                                      "transformers_version")}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**keep))
    if method == "compacter++":
        adapters.init(model)
        kw = {"reduction_factor": args.reduction_factor} if args.reduction_factor else {}
        model.add_adapter("bench", config=adapters.CompacterPlusPlusConfig(**kw))
        model.train_adapter("bench")
    elif method != "full":
        raise ValueError(f"torch_adapters supports full and compacter++, got {method!r}")
    model.to(device)
    total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-3 if method != "full" else 3e-4, weight_decay=0.0)

    num = len(arrays["input_ids"])
    host_s, torch_batches = [], []
    for i in range(num):
        t0 = time.perf_counter()
        torch_batches.append({k: v.to(device) for k, v in
                              _collate(arrays, i, padding, tokenizer).items()})
        host_s.append(time.perf_counter() - t0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else torch.autocast(device.type, enabled=False))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(batch):
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    times, cpu, losses = [], [], []
    for i, batch in enumerate(torch_batches):
        c0, t0 = time.process_time(), time.perf_counter()
        loss = float(step(batch))  # float() waits for the step
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            losses.append(loss)
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite training loss {losses}")
    timed = torch_batches[args.warmup:]
    src_tok = sum(int(b["attention_mask"].sum()) for b in timed)
    src_slots = sum(b["attention_mask"].numel() for b in timed)
    tgt_tok = sum(int((b["labels"] != -100).sum()) for b in timed)
    tgt_slots = sum(b["labels"].numel() for b in timed)
    examples = [int((b["attention_mask"].sum(1) > 0).sum()) for b in timed]
    wall = sum(times)
    flops = {k: arrays[k][args.warmup:] for k in ("flops_real", "flops_longest",
                                                  "flops_max_length") if k in arrays}
    slot_flops = flops.get("flops_longest" if padding == "dynamic" else "flops_max_length")
    peak_tflops = args.peak_tflops or None
    mfu = lambda f: (float(f.sum()) / wall / (peak_tflops * 1e12)  # noqa: E731
                     if peak_tflops and f is not None else None)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    cpu_name = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                     .splitlines() if ln.startswith("model name")), "cpu")
    return {
        "task": meta["task"], "method": method, "model": f"random:{args.preset}",
        "packing": False, "padding": padding,
        "layout": "dynamic padding" if padding == "dynamic" else
                  f"padded to {meta['source_length']}",
        "batch": meta["batch"], "steps": len(times), "warmup_steps": args.warmup,
        "dtype": args.dtype, "seed": meta["seed"], "data_seed": meta["data_seed"],
        "add_prefix": meta["add_prefix"], "train_rows": meta["train_rows"],
        "source_length": meta["source_length"], "target_length": meta["target_length"],
        "trainable_params": sum(p.numel() for p in trainable), "total_params": total,
        "examples_per_s": sum(examples) / wall,
        "tokens_per_s": (src_tok + tgt_tok) / wall,
        "step_time_s": statistics.median(times), "step_times_s": times,
        "step_cpu_s": statistics.median(cpu), "examples_per_step": examples,
        "rows_per_step": [int(b["input_ids"].shape[0]) for b in timed],
        "source_fill": src_tok / src_slots, "target_fill": tgt_tok / tgt_slots,
        "timed_source_tokens": src_tok, "timed_source_slots": src_slots,
        "timed_target_tokens": tgt_tok, "timed_target_slots": tgt_slots,
        "batch_shapes": [[int(b["input_ids"].shape[1]), int(b["labels"].shape[1])]
                         for b in timed],
        "host_batch_s": statistics.median(host_s),
        "peak_memory_mb": peak_cuda if peak_cuda is not None else peak_rss,
        "peak_memory_kind": "cuda_max_memory_allocated" if peak_cuda is not None
                            else "host_peak_rss",
        "host_peak_rss_mb": peak_rss,
        "compiles": 0, "compiles_counted_by": "eager PyTorch: nothing is compiled",
        "distinct_batch_shapes": len({(b["input_ids"].shape, b["labels"].shape) for b in timed}),
        "compile_time_s": [],
        "real_model_flops_per_step": float(flops["flops_real"].mean()) if flops else None,
        "slot_model_flops_per_step": float(slot_flops.mean()) if slot_flops is not None
                                     else None,
        "mfu_real": mfu(flops.get("flops_real")), "mfu": mfu(slot_flops),
        "peak_tflops": peak_tflops, "losses": losses, "final_loss": losses[-1],
        "platform": device.type,
        "device_kind": torch.cuda.get_device_name() if device.type == "cuda" else cpu_name,
        "device": (f"cuda: {torch.cuda.get_device_name()}" if device.type == "cuda"
                   else f"cpu: {cpu_name} ({os.cpu_count()} cores)"),
        "cpu_count": os.cpu_count(), "load_average_1m": load_average,
        "jax_version": None, "framework": "torch+adapters",
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
        "adapters_version": adapters.__version__, "torch_threads": torch.get_num_threads(),
    }


def run_real(args, hf: dict) -> list[dict]:
    """Every (task, method, padding) of the real-data mode, each in its own subprocess."""
    rows = []
    for task in [t.strip() for t in args.task.split(",") if t.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            with tempfile.TemporaryDirectory() as tmp:
                npz = Path(tmp) / "batches.npz"
                export = [args.project_python, "-m", "benchmarks.throughput",
                          "--export-batches", str(npz), "--num-batches",
                          str(args.warmup + args.steps), "--task", task, "--method", method,
                          "--model", f"random:{args.preset}", "--batch", str(args.batch),
                          "--seed", str(args.train_seed), "--data-seed", str(args.data_seed),
                          "--source-length", str(args.src_len)]
                if args.train_samples:
                    export += ["--train-samples", str(args.train_samples)]
                proc = subprocess.run(export, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"exporting the {task} batches failed:\n{proc.stderr}")
                for padding in [p.strip() for p in args.padding.split(",") if p.strip()]:
                    rows.append(_child_row(args, f"{method}={Path(tmp) / 'row.json'}",
                                           ["--child-padding", padding, "--child-batches",
                                            str(npz)],
                                           {"task": task, "method": method,
                                            "padding": padding}))
    return rows


def _child_row(args, child: str, extra: list[str], ident: dict) -> dict:
    """Runs this script as a child (`--child method=out`); a failure becomes a row with
    `error`."""
    out = Path(child.split("=", 1)[1])
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", child, *extra],
                          capture_output=True, text=True)
    if proc.returncode or not out.is_file():
        row = {**ident, "error": " / ".join(proc.stderr.strip().splitlines()[-3:])}
    else:
        row = json.loads(out.read_text())
    print(json.dumps({k: v for k, v in row.items() if k not in ("step_times_s", "losses")}),
          flush=True)
    return row


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
    # Real-data mode (module docstring).
    p.add_argument("--task", default=None,
                   help="comma-separated tasks: train on their real rows (real-data mode)")
    p.add_argument("--padding", default="dynamic,max_length",
                   help="real-data mode: dynamic (per batch) and/or max_length (src-len)")
    p.add_argument("--train-seed", type=int, default=42, help="real-data mode: row order seed")
    p.add_argument("--data-seed", type=int, default=42, help="real-data mode: paper-split seed")
    p.add_argument("--train-samples", type=int, default=None,
                   help="real-data mode: first n training rows (smoke tests)")
    p.add_argument("--device", default="cpu", help="real-data mode: torch device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="real-data mode: bfloat16 = torch.autocast")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="real-data mode: device peak TFLOP/s for mfu / mfu_real")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-padding", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-batches", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    hf = preset_hf_dict(args.preset, args.project_python)
    if args.child:
        method, out = args.child.split("=", 1)
        row = (measure_real(args, hf, method, args.child_padding, args.child_batches)
               if args.child_batches else measure(args, hf, method))
        Path(out).write_text(json.dumps(row))
        return
    bad = {p for p in args.padding.split(",") if p.strip()} - {"dynamic", "max_length"}
    if bad:
        raise SystemExit(f"--padding: unknown {sorted(bad)}; choose dynamic and/or max_length")
    if args.task:
        rows = run_real(args, hf)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
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
