"""Every task of the registry trains 2 steps (one method), every preset trains 2 steps (one short
task), on a tiny T5 saved and loaded through the HF-format path; a run shorter than its
warm-up follows HF's ramp-only schedule; the task prefix follows the method.

Tasks without local files (QQP, MNLI, QNLI train, BoolQ train, MultiRC, ReCoRD, SuperGLUE RTE,
WiC, WSC) get a few synthetic rows in the files layout, written next to the real files.
Compiles are shared through JAX's persistent compilation cache (same shapes, same programs).
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from compacter_jax import data as data_lib
from compacter_jax.models import T5Config, T5ForConditionalGeneration, init_params, save_pretrained
from compacter_jax.peft import (get_method, load_adapter, load_trainable, method_names,
                                save_adapter)
from experiments import finetune
from experiments.configs.glue import get_config

# d_model 48: reduction factor 4 -> bottleneck 12, which n = 4 and n = 12 (PHM-Adapter) divide.
TINY = T5Config(vocab_size=32128, d_model=48, d_kv=16, d_ff=64, num_layers=2,
                num_decoder_layers=2, num_heads=2)
OVERRIDES = {"adapter": {"reduction_factor": 4}, "pfeiffer": {"reduction_factor": 4},
             "adapterdrop": {"reduction_factor": 4, "drop_first": 1},
             "lowrank": {"reduction_factor": 4}, "phm_adapter": {"reduction_factor": 4},
             "compacter": {"reduction_factor": 4}, "compacter++": {"reduction_factor": 4},
             "prompt_tuning": {"length": 4}, "prompt_tuning_vocab": {"length": 4},
             "intrinsic_said": {"dim": 2000}, "attempt": {"length": 4, "attn_dim": 8},
             # SNIP is tested in tests/peft/test_sparsity.py; random pruning compiles no gradient
             "sparse_adapter": {"reduction_factor": 4, "prune": "random"},
             "large_sparse_adapter": {"reduction_factor": 2, "prune": "random"}}
SYNTHETIC = ("qqp", "mnli", "qnli", "boolq", "multirc", "record", "superglue_rte", "wic",
             "wsc.fixed")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Identical programs (same model, method and shapes) compile once for the module, and
    XLA skips its slow optimisation passes (these tiny programs run in milliseconds anyway)."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_disable_most_optimizations")
    old = {name: jax.config.values[name] for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    for name, value in old.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "t5"
    save_pretrained(path, TINY, init_params(T5ForConditionalGeneration(TINY),
                                            jax.random.PRNGKey(0)))
    return str(path)


def _words(i: int, n: int = 6) -> str:
    return " ".join(f"w{(i * 7 + k) % 97}" for k in range(n))


def _write_glue(root, task, n):
    """A GLUE-layout TSV per official split of `task` with `n` rows (digit labels)."""
    layout = data_lib.files._GLUE[task.name]
    columns = list(layout.text_columns.values()) + [layout.label_column]
    splits = ("train", task.validation_split) + ((task.test_split,) if task.test_split else ())
    for split in splits:
        path = root / "glue" / layout.directory / data_lib.files._GLUE_FILES[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            continue
        lines = ["\t".join(columns)] + [
            "\t".join([_words(i + j) for j in range(len(layout.text_columns))]
                      + [str(i % task.num_classes)]) for i in range(n)]
        path.write_text("\n".join(lines) + "\n")


def _superglue_row(task, i):
    if task.name == "record":
        return {"passage": f"Ann met Bob. {_words(i)}", "query": "@placeholder met Bob.",
                "entities": ["Ann", "Bob"], "answers": ["Ann"],
                "idx": {"passage": i, "query": i}}
    if task.name.startswith("wsc"):
        return {"text": "Ann said that she " + _words(i, 3), "span1_index": 0,
                "span2_index": 3, "span1_text": "Ann", "span2_text": "she",
                "label": i % 2, "idx": i}
    row = {field: _words(i + j) for j, field in enumerate(task.input_fields)}
    row.update(label=i % task.num_classes, idx=i)
    if task.name == "multirc":
        row["idx"] = {"paragraph": i // 4, "question": i // 2, "answer": i}
    return row


def _write_superglue(root, task, n):
    folder = root / "superglue" / data_lib.files._SUPERGLUE_DIRS[task.name]
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        path = folder / data_lib.files._SUPERGLUE_FILES[split]
        if not path.exists():
            path.write_text("".join(json.dumps(_superglue_row(task, i)) + "\n"
                                    for i in range(n)))


@pytest.fixture(scope="module")
def data_dir(shared_data, tmp_path_factory):
    """The shared files plus synthetic ones for the tasks that have none here."""
    root = tmp_path_factory.mktemp("data")
    shutil.copytree(shared_data / "glue", root / "glue")
    shutil.copytree(shared_data / "superglue", root / "superglue")
    for name in SYNTHETIC:
        task = data_lib.get_task(name)
        n = 1010 if not task.is_small else 24  # large tasks hold out 1,000 rows
        if task.tfds_name.startswith("glue/"):
            _write_glue(root, task, n)
        else:
            _write_superglue(root, task, n)
    return root


def config_for(backbone, data_dir, task, method, **fields):
    c = get_config()
    c.model, c.fallback_model, c.task, c.method = backbone, "", task, method
    c.source, c.data_dir = "files", str(data_dir)
    for k, v in OVERRIDES.get(method, {}).items():
        setattr(c.peft, k, v)
    c.max_source_length, c.max_target_length = 32, 4
    c.batch_size, c.eval_batch_size, c.max_eval_samples = 4, 4, 4
    c.max_steps, c.warmup_steps, c.eval_every, c.log_every = 2, 500, 2, 1
    c.learning_rate, c.num_devices, c.eval_test, c.eval_mode = 1e-3, 1, False, "generate"
    c.packing = False   # one padded shape for every task: compiles are shared
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def _events(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task", data_lib.task_names())
def test_every_task_trains_two_steps(task, backbone, data_dir, tmp_path):
    summary = finetune.train_and_evaluate(config_for(backbone, data_dir, task, "compacter++"),
                                          tmp_path)
    losses = [e["train/loss"] for e in _events(tmp_path) if "train/loss" in e]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert summary["task"] == data_lib.get_task(task).name and summary["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "predictions" / "validation.jsonl").open()]
    assert len(rows) == 4 and {"index", "source", "target", "prediction", "parsed"} <= set(rows[0])


@pytest.fixture(scope="module")
def source_prompts(tmp_path_factory, backbone):
    """ATTEMPT's source prompts: two prompt-tuning exports (random prompts, length 4)."""
    root, paths = tmp_path_factory.mktemp("sources"), []
    for k in range(2):
        prompt = np.random.default_rng(k).normal(size=(4, TINY.d_model)).astype(np.float32)
        paths.append(str(save_adapter(root / f"src{k}", {"encoder": {"prompt": {
            "embedding": prompt}}}, get_method("prompt_tuning", length=4), model=backbone)))
    return tuple(paths)


@pytest.mark.parametrize("method", [  # Large-Sparse: sparse_adapter's code, another size
    pytest.param(m, marks=pytest.mark.long) if m == "large_sparse_adapter" else m
    for m in method_names()])
def test_every_method_trains_two_steps(method, backbone, data_dir, tmp_path, request):
    # No evaluation: only the train step is compiled per method.
    config = config_for(backbone, data_dir, "rte", method, eval_every=0)
    if method == "attempt":
        config.peft.sources = request.getfixturevalue("source_prompts")
    summary = finetune.train_and_evaluate(config, tmp_path)
    events = _events(tmp_path)
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert summary["method"] == method and summary["trainable_params"] > 0
    # 2 steps with a warm-up of 500: HF's rule ramps for the whole run, lr(step) = peak*step/500.
    rates = [e["train/learning_rate"] for e in events if "train/learning_rate" in e]
    np.testing.assert_allclose(rates, [1e-3 * 0 / 500, 1e-3 * 1 / 500], rtol=1e-4, atol=1e-12)  # float32
    assert not (tmp_path / "predictions").exists()       # eval_every=0: never evaluated
    if method == "attempt":   # target prompt + attention trained; the exported sources reloaded
        assert summary["trainable_params"] == 4 * 48 + 2 * 48 * 8 + 2 * 48
        _, params = load_adapter(tmp_path / "adapter")
        np.testing.assert_array_equal(params["encoder"]["prompt"]["sources"], np.stack(
            [load_trainable(p)[0]["encoder"]["prompt"]["embedding"] for p in config.peft.sources]))


@pytest.mark.parametrize("method,override,prefixed", [
    ("compacter++", None, False), ("full", None, True), ("prompt_tuning_vocab", None, True),
    ("bitfit", False, False), ("compacter", True, True)])
def test_the_task_prefix_follows_the_method(method, override, prefixed, data_dir, tokenizer):
    """The original prepends the task name unless adapters are trained; the config overrides."""
    c = config_for("unused", data_dir, "rte", method, add_task_prefix=override)
    method_obj = finetune.peft.get_method(method)
    add = method_obj.task_prefix if override is None else override
    encoded = finetune.load_data(c, data_lib.get_task("rte"), tokenizer, add)
    for split in ("train", "validation", "test"):
        assert encoded[split].sources[0].startswith("rte sentence1:") == prefixed
        assert encoded[split].sources[0].count("sentence1:") == 1
