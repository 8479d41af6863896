"""Mixed-task serving (compacter_jax.serve, experiments.predict): a mixed file of real RTE,
MRPC and CoLA examples gets, example by example, the tokens that the single-task model with
that adapter generates; bad input exits with code 2 and names the task, file or mismatch."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_runs

from compacter_jax import data as data_lib
from compacter_jax import peft
from compacter_jax.models import greedy_generate
from compacter_jax.peft import bank as bank_lib
from compacter_jax.serve import Predictor, ServeError
from experiments import predict

BACKBONE = "random:t5-tiny"
# (task, max_source_length): the adapters were "trained" with different source cuts.
TASKS = (("rte", 48), ("mrpc", 64), ("cola", 32))
PER_TASK = 5


@pytest.fixture(scope="module", autouse=True)
def fast_compiles(tmp_path_factory):
    """XLA skips its slow optimisation passes (compile time dominates these tiny programs),
    and a program compiled again (each backbone draw, each Predictor) comes from jax's
    persistent cache, for this module."""
    with tiny_runs.fast_compiles():
        yield


@functools.lru_cache(maxsize=None)
def _init(method):
    """The method's initial trainable tree on the tiny T5 (drawn once per method)."""
    _, params = peft.from_pretrained(BACKBONE, method, jax.random.PRNGKey(0))
    return method.partition(params)[0]


def export(path, method, task, seed, *, init_seed=0, model=BACKBONE, source_length=64,
           tensors_of=None):
    """An adapter export as experiments.glue writes it: the method's init on the tiny T5 plus
    noise; `model` / `init_seed` are the backbone it records. `tensors_of`: draw the tensors
    of that method instead (an export refused for its recorded method needs no draw)."""
    rs = np.random.RandomState(seed)
    trainable = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.5 * rs.randn(*x.shape).astype(np.float32),
        _init(tensors_of or method))
    return peft.save_adapter(path, trainable, method, model=model, task=task, step=1,
                             init_seed=init_seed, max_source_length=source_length,
                             max_target_length=3, add_task_prefix=method.task_prefix)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    method = peft.get_method("compacter++", reduction_factor=8)
    return {task: export(root / task, method, task, seed, source_length=length)
            for seed, (task, length) in enumerate(TASKS)}


@pytest.fixture(scope="module")
def examples(files_source):
    """Interleaved validation examples of the three tasks (labels kept: they are ignored)."""
    per_task = [[{"task": task, **ex} for ex in files_source.load(task, "validation")[:PER_TASK]]
                for task, _ in TASKS]
    return [ex for group in zip(*per_task) for ex in group]


@pytest.fixture(scope="module")
def reference(adapters, examples, tokenizer):
    """{task: (tokens [n, 3], texts)}: what each adapter alone generates for its examples
    (`peft.load_adapter` + the library's `greedy_generate`, as experiments.glue evaluates).
    Sources are padded to one width so that the three tasks share one compiled program."""
    out = {}
    for task, _ in TASKS:
        model, params = peft.load_adapter(adapters[task])
        _, meta = peft.load_trainable(adapters[task])
        mine = [ex for ex in examples if ex["task"] == task]
        encoded = data_lib.encode(task, mine, tokenizer,
                                  max_source_length=meta["max_source_length"],
                                  max_target_length=meta["max_target_length"],
                                  add_prefix=meta["add_task_prefix"])
        pad = 64 - encoded.input_ids.shape[1]
        tokens = np.asarray(greedy_generate(
            model, params, np.pad(encoded.input_ids, ((0, 0), (0, pad))),
            np.pad(encoded.attention_mask, ((0, 0), (0, pad))), max_new_tokens=3))
        out[task] = tokens, data_lib.decode_predictions(tokenizer, tokens)
    return out


def test_mixed_batches_give_the_single_adapter_tokens(adapters, examples, reference, tokenizer):
    predictor = Predictor(BACKBONE, adapters, tokenizer=tokenizer, batch_size=4)
    assert predictor.tasks == ("rte", "mrpc", "cola")
    tokens = predictor.generate(examples)  # four length-sorted batches mixing the tasks
    for task, _ in TASKS:
        got = np.stack([t for t, ex in zip(tokens, examples) if ex["task"] == task])
        np.testing.assert_array_equal(got, reference[task][0], err_msg=task)
    # Three adapters, three behaviours: a mixed-up gather would show.
    assert len({reference[task][0].tobytes() for task, _ in TASKS}) == 3
    # One compiled decoder per length bucket, whatever the mix of tasks in the batches.
    decoder = bank_lib._compiled_generate(predictor.model, predictor.method,
                                          predictor.max_new_tokens, 1)
    widths = {ids.shape[1] for *_, ids, _ in predictor._batches(*predictor.encode(examples))}
    assert decoder._cache_size() == len(widths) >= 2
    again = predictor.generate(examples[::-1])
    assert decoder._cache_size() == len(widths)
    for got, want in zip(again, tokens[::-1]):
        np.testing.assert_array_equal(got, want)


def test_cli_on_a_mixed_file(adapters, examples, reference, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    out = tmp_path / "out.jsonl"
    spec = ",".join(f"{task}={path}" for task, path in adapters.items())
    # In-process (`main` returns the exit code): a subprocess would re-import and recompile.
    code = predict.main(["--backbone", BACKBONE, "--adapters", spec, "--input", str(source),
                         "--output", str(out), "--batch-size", "8"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("prediction", "parsed")} for r in rows] \
        == examples
    for task, _ in TASKS:
        mine = [r for r in rows if r["task"] == task]
        want = reference[task][1]
        assert [r["prediction"] for r in mine] == want
        parse = data_lib.get_task(task).parse_prediction
        assert [r["parsed"] for r in mine] == [parse(t) for t in want]


def run_main(capsys, *args):
    code = predict.main(list(args))
    return code, capsys.readouterr().err


def test_bad_inputs_exit_2_with_a_clear_message(adapters, examples, tmp_path, capsys):
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps(ex) + "\n" for ex in examples[:3]))
    rte_only = tmp_path / "rte.jsonl"
    rte_only.write_text(json.dumps(examples[0]) + "\n")
    mrpc_only = tmp_path / "mrpc.jsonl"
    mrpc_only.write_text(json.dumps(examples[1]) + "\n")
    out = str(tmp_path / "out.jsonl")
    spec = ",".join(f"{task}={path}" for task, path in adapters.items())

    code, err = run_main(capsys, "--adapters", f"rtee={adapters['rte']}", "--input", str(good),
                         "--output", out)
    assert code == 2 and "unknown task 'rtee'" in err

    missing = tmp_path / "nowhere.jsonl"
    code, err = run_main(capsys, "--adapters", spec, "--input", str(missing), "--output", out)
    assert code == 2 and f"input file {missing} not found" in err

    code, err = run_main(capsys, "--adapters", f"rte={tmp_path / 'no_adapter'}", "--input",
                         str(rte_only), "--output", out)
    assert code == 2 and "no_adapter" in err and "not found" in err

    other_task = tmp_path / "sst2.jsonl"
    other_task.write_text(json.dumps(examples[0]) + "\n"
                          + json.dumps({"task": "sst2", "sentence": "fine"}) + "\n")
    code, err = run_main(capsys, "--adapters", spec, "--input", str(other_task), "--output", out)
    assert code == 2 and f"{other_task}:2" in err and "'sst2' has no adapter" in err

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(examples[0]) + "\n{not json\n")
    code, err = run_main(capsys, "--adapters", spec, "--input", str(bad_json), "--output", out)
    assert code == 2 and f"{bad_json}:2: not valid JSON" in err

    lacking = tmp_path / "lacking.jsonl"
    lacking.write_text(json.dumps({"task": "rte", "sentence1": "only one"}) + "\n")
    code, err = run_main(capsys, "--adapters", spec, "--input", str(lacking), "--output", out)
    assert code == 2 and f"{lacking}:1" in err and "'sentence2'" in err

    code, err = run_main(capsys, "--adapters", f"mrpc={adapters['rte']}", "--input",
                         str(mrpc_only), "--output", out)
    assert code == 2 and "trained on task 'rte'" in err and "mrpc" in err
    assert not Path(out).exists()


def test_mismatched_adapters_are_refused(adapters, tmp_path, capsys):
    method = peft.get_method("compacter++", reduction_factor=8)
    # Refused on the methods the exports record, before any tensor is read.
    lora = export(tmp_path / "lora", peft.get_method("lora", rank=2), "mrpc", 7,
                  tensors_of=method)
    with pytest.raises(ServeError, match=r"different methods.*rte.*'compacter\+\+'.*mrpc.*'lora'"):
        Predictor(BACKBONE, {"rte": adapters["rte"], "mrpc": lora})
    reseeded = export(tmp_path / "seed1", method, "mrpc", 8, init_seed=1)
    with pytest.raises(ServeError, match="different backbones.*init_seed 0 and 1"):
        Predictor(BACKBONE, {"rte": adapters["rte"], "mrpc": reseeded})
    small = export(tmp_path / "small", method, "mrpc", 9, model="random:t5-small")
    with pytest.raises(ServeError,
                       match="different backbones.*'random:t5-tiny'.*'random:t5-small'"):
        Predictor(None, {"rte": adapters["rte"], "mrpc": small})
    with pytest.raises(ServeError, match="unknown task 'rtee'"):
        Predictor(BACKBONE, {"rtee": adapters["rte"]})
    # The CLI says the same and exits 2.
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"task": "mrpc", "sentence1": "a", "sentence2": "b"}) + "\n")
    code, err = run_main(capsys, "--adapters", f"rte={adapters['rte']},mrpc={lora}", "--input",
                         str(source), "--output", str(tmp_path / "o.jsonl"))
    assert code == 2 and "different methods" in err, err


def test_a_short_call_is_padded_to_its_examples_not_to_batch_size(adapters, examples,
                                                                   tokenizer):
    """batch_size is an upper bound: one example with batch_size=10**9 decodes one row (it
    used to allocate 10**9 rows). (Rows decode independently: the tokens of a padded last
    batch are checked by test_mixed_batches_give_the_single_adapter_tokens.)"""
    predictor = Predictor(BACKBONE, {"rte": adapters["rte"]}, tokenizer=tokenizer,
                          batch_size=10**9)
    rte = [ex for ex in examples if ex["task"] == "rte"]
    (rows, _, input_ids, mask), = predictor._batches(*predictor.encode(rte[:1]))
    assert input_ids.shape[0] == mask.shape[0] == 1 and list(rows) == [0]
    from compacter_jax.serve import padded_rows
    assert [padded_rows(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert [padded_rows(n, 6) for n in (3, 5, 6)] == [4, 6, 6]


def test_output_and_input_are_checked_before_any_work(adapters, examples, tmp_path, capsys,
                                                      monkeypatch):
    """An unusable --output is refused before the backbone loads (it used to fail after all
    the work, leaving OUTPUT.tmp-PID); a non-UTF-8 input names its file and line."""
    def no_work(*args, **kwargs):
        raise AssertionError("the backbone was loaded before the input was checked")

    monkeypatch.setattr(predict, "Predictor", no_work)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(examples[0]) + "\n")
    spec = f"rte={adapters['rte']}"
    outputs = [(tmp_path, f"--output {tmp_path} is a directory")]
    if Path("/proc/version").is_file():
        outputs.append(("/proc/version", "--output /proc/version: cannot write in /proc"))
    for out, named in outputs:
        code, err = run_main(capsys, "--adapters", spec, "--input", str(source), "--output",
                             str(out))
        assert code == 2 and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no temporary left

    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(json.dumps(examples[0]).encode() + b"\n"
                       + '{"task": "rte", "sentence1": "caf\u00e9"}\n'.encode("latin-1"))
    code, err = run_main(capsys, "--adapters", spec, "--input", str(latin1), "--output",
                         str(tmp_path / "out.jsonl"))
    assert code == 2 and f"{latin1}:2: not UTF-8 text (byte 0xe9 at column 34)" in err, err


def test_a_failed_output_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")

    def disk_fails(*_):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("os.fsync", disk_fails)
    with pytest.raises(OSError, match="injected"):
        predict.write_examples(out, [{"task": "rte", "prediction": "entailment"}])
    monkeypatch.undo()
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "out.jsonl"]
    predict.write_examples(out, [{"task": "rte", "prediction": "entailment"}])
    assert json.loads(out.read_text()) == {"task": "rte", "prediction": "entailment"}


def test_an_adapter_that_does_not_fit_is_refused_as_load_adapter_refuses_it(adapters, tmp_path):
    """The Predictor fits exports with `peft.load_adapter`'s code (`fit_export`): its message
    (tests/peft/test_export.py), as a ServeError naming the task."""
    from flax import traverse_util

    trained, meta = peft.load_trainable(adapters["mrpc"])
    flat = traverse_util.flatten_dict(trained)
    flat.pop(next(k for k in flat if k[-1] == "phm_left"))
    method = peft.method_of_export(meta)
    partial = peft.save_adapter(tmp_path / "partial", traverse_util.unflatten_dict(flat), method,
                                **{k: v for k, v in meta.items()
                                   if k not in ("method", "tensors", "sha256")})
    with pytest.raises(ServeError, match=r"the mrpc adapter: .*partial: the export does not fit "
                                         r"random:t5-tiny .*missing \['.*phm_left'\]"):
        Predictor(BACKBONE, {"mrpc": partial})
