"""The real-data throughput benchmark (`benchmarks.throughput`).

Fast tests check the data side on real SST-2 / RTE rows (recipe order, packing keeps the
examples and fills more slots, the export for PyTorch) against explicit numpy computations;
the slow smoke test runs the CLI end to end on random:t5-tiny (2 steps, a few hundred rows,
packed and padded children: ~45 CPU-s, most of it two XLA compilations; 107 s wall at load
average 10 on the 2 shared cores).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from benchmarks import throughput
from compacter_jax.data import epoch_permutation, pad_batch
from compacter_jax.data import packing as packing_lib

ROWS = 300


@pytest.fixture(scope="module")
def sst2(shared_data, t5_vocab):
    return throughput.encode_train_split("sst2", add_prefix=False, train_samples=ROWS)


def _examples(batch):
    """Multiset of (source ids, label ids) of the real examples of a padded batch."""
    src, tgt = batch["attention_mask"].sum(1), batch["decoder_attention_mask"].sum(1)
    return Counter((tuple(i[:s]), tuple(l[:t])) for i, s, l, t in
                   zip(batch["input_ids"], src, batch["labels"], tgt))


def test_encoded_split_is_the_papers_train_rows(sst2):
    assert len(sst2) == ROWS
    assert sst2.input_ids.shape == (ROWS, 128)
    assert sst2.labels.shape == (ROWS, 3)  # "▁", "0"/"1", "</s>" at most
    lengths = sst2.attention_mask.sum(1)
    assert lengths.min() > 1 and lengths.max() < 128  # real sentences, none truncated
    assert len(np.unique(lengths)) > 1  # of varied length
    # No truncation: every source still ends with its EOS (id 1) at its last real position.
    assert (sst2.input_ids[range(ROWS), lengths - 1] == 1).all()
    prefixed = throughput.encode_train_split("sst2", add_prefix=True, train_samples=ROWS)
    # The task prefix ("sst2 sentence: ...") adds tokens to every source, nothing else changes.
    assert (prefixed.attention_mask.sum(1) > lengths).all()
    np.testing.assert_array_equal(prefixed.labels, sst2.labels)


def test_recipe_batches_follow_the_epoch_permutations(sst2):
    batch = 32  # 300 rows: 9 full batches and one of 12 per epoch (the original keeps it)
    batches = throughput.recipe_batches(sst2, batch, seed=42, num_batches=12)
    assert [len(b["input_ids"]) for b in batches] == [32] * 9 + [12] + [32] * 2
    order = [epoch_permutation(ROWS, 42, e) for e in (0, 1)]
    expected = np.concatenate([order[0], order[1][:2 * batch]])
    got = np.concatenate([b["input_ids"] for b in batches])
    np.testing.assert_array_equal(got, sst2.input_ids[expected])


def test_packing_keeps_the_examples_and_fills_more_slots(sst2):
    batch = 32
    plan = packing_lib.plan_packing(sst2, batch, seed=42, num_epochs=1)
    for i, padded in enumerate(throughput.recipe_batches(sst2, batch, seed=42, num_batches=10)):
        packed = plan.pack(padded)
        real = 12 if i == 9 else batch  # the epoch's partial last batch
        assert throughput.examples_in(packed) == throughput.examples_in(padded) == real
        assert throughput.examples_in(pad_batch(padded, batch)) == real
        assert packed["input_ids"].shape[0] in plan.row_buckets
        unpacked = Counter((tuple(s), tuple(t)) for s, t in packing_lib.unpack_batch(packed))
        assert unpacked == _examples(padded)
        f_packed, f_padded = packing_lib.fill(packed), packing_lib.fill(padded)
        assert f_packed["source_tokens"] == f_padded["source_tokens"]
        assert f_packed["target_tokens"] == f_padded["target_tokens"]
        assert (f_packed["source_tokens"] / f_packed["source_slots"]
                > 3 * f_padded["source_tokens"] / f_padded["source_slots"])


def test_examples_in_counts_segments_and_real_rows():
    segments = np.array([[1, 1, 2, 3, 0], [1, 2, 2, 0, 0], [0, 0, 0, 0, 0]], np.int32)
    packed = {"encoder_segment_ids": segments, "attention_mask": (segments > 0).astype(np.int32)}
    assert throughput.examples_in(packed) == 3 + 2
    padded = {"attention_mask": np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], np.int32)}
    assert throughput.examples_in(padded) == 2


def test_export_batches_for_pytorch(tmp_path, shared_data, t5_vocab):
    cfg = throughput.ThroughputConfig(task="rte", model="random:t5-tiny", method="full",
                                      batch=4, train_samples=42)
    out = tmp_path / "rte.npz"
    throughput.export_batches(cfg, 12, out)  # 42 rows: 10 batches of 4, then one of 2
    data = np.load(out)
    meta = json.loads(str(data["meta"]))
    assert meta["add_prefix"] is True and meta["target_length"] == 3
    assert data["input_ids"].shape == (12, 4, 128)
    assert data["num_examples"].tolist() == [4] * 10 + [2, 4]
    encoded = throughput.encode_train_split("rte", add_prefix=True, train_samples=42)
    for i, batch in enumerate(throughput.recipe_batches(encoded, 4, seed=42, num_batches=12)):
        n = data["num_examples"][i]
        for key in ("input_ids", "attention_mask", "labels", "decoder_attention_mask"):
            np.testing.assert_array_equal(data[key][i][:n], batch[key])
            assert not data[key][i][n:].any()  # empty filler rows
    # Useful FLOPs never exceed those of the padded shapes; the batch-longest shape lies between.
    assert (data["flops_real"] <= data["flops_longest"]).all()
    assert (data["flops_longest"] <= data["flops_max_length"]).all()
    assert data["flops_real"].min() > 0


def test_markdown_table_compares_with_the_padded_run():
    row = dict(task="sst2", method="full", rows_per_step=[32, 32], source_fill=0.13,
               target_fill=0.8, step_time_s=2.0, step_cpu_s=3.9, examples_per_s=16.0,
               peak_memory_mb=900.0, compiles=1, compile_time_s=[9.5])
    packed = {**row, "packing": True, "rows_per_step": [6, 8], "examples_per_s": 40.0,
              "compiles": 2, "compile_time_s": [5.0, 6.0]}
    lines = throughput.markdown_table(
        [packed, {**row, "packing": False},
         {"task": "sst2", "method": "lora", "packing": True, "error": "exit 1: boom"}]
    ).splitlines()
    cells = [c.strip() for c in lines[2].split("|")]
    assert cells[3:5] == ["packed", "7.0"] and cells[10] == "2.50x"
    assert cells[12:14] == ["2", "5.0 + 6.0"]
    assert "failed: exit 1: boom" in lines[4]


def test_markdown_table_names_the_three_layouts():
    row = dict(task="sst2", method="full", rows_per_step=[8], source_fill=0.9,
               target_fill=0.4, step_time_s=1.0, step_cpu_s=2.0, examples_per_s=32.0,
               peak_memory_mb=900.0, compiles=1, compile_time_s=[9.5])
    rows = [{**row, "packing": True, "tight_targets": True, "target_fill": 0.8},
            {**row, "packing": True, "tight_targets": False},
            {**row, "packing": False, "tight_targets": None, "examples_per_s": 8.0}]
    lines = throughput.markdown_table(rows).splitlines()[2:]
    cells = [[c.strip() for c in line.split("|")] for line in lines]
    assert [(c[3], c[14]) for c in cells] == [("packed", "tight"), ("packed", "one length"),
                                              ("padded", "–")]
    assert [c[6] for c in cells] == ["0.80", "0.40", "0.40"]
    assert [c[10] for c in cells] == ["4.00x", "4.00x", "1.00x"]
    assert throughput.LAYOUTS["packed"] == (True, False)  # one worst-case target length


def test_bad_arguments_name_the_option():
    with pytest.raises(SystemExit, match="--layouts"):
        throughput.main(["--layouts", "packed,tight"])
    with pytest.raises(SystemExit, match="--layouts"):
        throughput.main(["--layouts", "packed", "--no-packing"])
    with pytest.raises(ValueError, match="--batch"):
        throughput.ThroughputConfig(batch=0)
    with pytest.raises(ValueError, match="--train-samples"):
        throughput.ThroughputConfig(batch=32, train_samples=10)
    with pytest.raises(SystemExit, match="unknown"):
        throughput.main(["--methods", "compacter++,nope"])
    with pytest.raises(SystemExit, match="unknown"):
        throughput.main(["--tasks", "sst3"])
    with pytest.raises(ValueError, match="--no-packing"):  # raised before any data or model
        throughput.measure(throughput.ThroughputConfig(method="prompt_tuning", packing=True))


REQUIRED = ("task", "method", "packing", "batch", "examples_per_s", "step_time_s",
            "step_times_s", "source_fill", "target_fill", "peak_memory_mb", "compiles",
            "compile_time_s", "compiled_shapes", "platform", "cpu_count", "device_kind",
            "examples_per_step", "real_model_flops_per_step", "final_loss")


@pytest.mark.slow
def test_cli_packed_and_padded_on_tiny(tmp_path, monkeypatch, shared_data, t5_vocab):
    # The children inherit this: XLA:CPU without LLVM optimisation compiles the tiny step in
    # less than half the time (same loss); no timing is asserted here.
    flags = os.environ.get("XLA_FLAGS", "")
    monkeypatch.setenv("XLA_FLAGS", f"{flags} --xla_backend_optimization_level=0".strip())
    out = tmp_path / "tiny.json"
    rows = throughput.main([
        "--task", "sst2", "--model", "random:t5-tiny", "--method", "compacter++",
        "--batch", "8", "--steps", "2", "--warmup", "0", "--train-samples", str(ROWS),
        "--plan-epochs", "1", "--reduction-factor", "8", "--json", str(out)])
    assert [r.get("error") for r in rows] == [None, None]
    saved = json.loads(out.read_text())
    assert [(r["task"], r["method"], r["packing"]) for r in saved] == [
        ("sst2", "compacter++", True), ("sst2", "compacter++", False)]
    packed, padded = saved
    for row in saved:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, missing
        assert np.isfinite(row["losses"]).all() and len(row["step_times_s"]) == 2
        assert row["examples_per_step"] == [8, 8]
        assert row["examples_per_s"] == pytest.approx(16 / sum(row["step_times_s"]))
        assert row["compiles"] == len(row["compile_time_s"]) == len(row["compiled_shapes"]) >= 1
        assert row["platform"] == "cpu" and row["cpu_count"] >= 1 and row["peak_memory_mb"] > 0
    # Same examples per step, far fewer padding slots when packed.
    assert packed["timed_source_tokens"] == padded["timed_source_tokens"]
    assert packed["real_model_flops_per_step"] == padded["real_model_flops_per_step"]
    assert packed["source_fill"] > 3 * padded["source_fill"]
    assert padded["rows_per_step"] == [8, 8] and max(packed["rows_per_step"]) < 8
    assert padded["compiled_shapes"] == [[8, 128, 3]]
    assert packed["compiles"] <= len(packed["packing_plan"]["row_buckets"])
    assert "| packed |" in out.with_suffix(".md").read_text()
