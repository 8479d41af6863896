"""Adapter exports: round trip (bfloat16 too), the manifest catches a missing tensor, a flipped
bit and an edited method field, NaN is refused both ways, and exports written by
compacter-jax 0.1 (tests/peft/data/legacy_v0.1, made by the 0.1 code) still load."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from compacter_jax import peft
from compacter_jax.models import stack_blocks
from compacter_jax.peft.export import CONFIG, WEIGHTS

LEGACY = Path(__file__).parent / "data" / "legacy_v0.1"
TREE = {"adapter": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
                    "bias": np.ones(3, np.float32)},
        "lm_head": {"kernel": np.full((3, 2), 0.5, np.float32)}}


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_and_load_trainable(tmp_path):
    params = dict(TREE)
    params["adapter"] = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16),
                                               params["adapter"])
    meta = {"method": "compacter", "phm_dim": 4, "backbone": "t5-base"}
    out = peft.export_trainable(tmp_path / "adapter", params, meta)
    peft.export_trainable(out, params, meta)  # overwriting is fine
    loaded, loaded_meta = peft.load_trainable(out)
    assert {k: loaded_meta[k] for k in meta} == meta
    assert sorted(loaded_meta["tensors"]) == ["adapter/bias", "adapter/kernel", "lm_head/kernel"]
    assert_trees_equal(loaded, jax.tree_util.tree_map(np.asarray, params))
    assert loaded["adapter"]["kernel"].dtype == jnp.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no stray temp dirs
    modes = {f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(modes) == 1 and modes != {0o600}  # both as a plain open() makes them
    with pytest.raises(FileNotFoundError, match="adapter export"):
        peft.load_trainable(tmp_path)


def test_a_failed_export_keeps_the_previous_one_and_no_temporary(tmp_path, monkeypatch):
    """Killed while writing the weights or the JSON (injected): the previous export loads
    unchanged and nothing else is left beside it."""
    out = peft.export_trainable(tmp_path / "adapter", TREE, {"method": {"family": "Method"}})
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    newer = jax.tree_util.tree_map(lambda x: x + 1, TREE)

    def killed(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.flax.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        peft.export_trainable(out, newer, {"method": {"family": "Method"}})
    monkeypatch.undo()
    monkeypatch.setattr("os.fsync", killed)                # the JSON, after the weights
    with pytest.raises(KeyboardInterrupt):
        peft.export_trainable(out, newer, {"method": {"family": "Method"}})
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert_trees_equal(peft.load_trainable(out)[0], TREE)


def test_manifest_refuses_corrupt_or_edited_exports(tmp_path):
    def fresh(name):
        return peft.export_trainable(tmp_path / name, TREE, {"method": {"family": "Method"}})

    flipped = fresh("flipped")
    data = bytearray((flipped / WEIGHTS).read_bytes())
    data[-3] ^= 0x01                                   # one bit of a tensor value
    (flipped / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(peft.AdapterFileError, match="corrupt.*sha256"):
        peft.load_trainable(flipped)

    edited = fresh("edited")
    record = json.loads((edited / CONFIG).read_text())
    record["method"]["name"] = "other"
    (edited / CONFIG).write_text(json.dumps(record))
    with pytest.raises(peft.AdapterFileError, match="modified after export"):
        peft.load_trainable(edited)

    missing = fresh("missing")   # the weights re-written without one tensor, checksum updated
    from safetensors.numpy import save_file

    save_file({"adapter/kernel": TREE["adapter"]["kernel"]}, str(missing / WEIGHTS))
    record = json.loads((missing / CONFIG).read_text())
    record["sha256"][WEIGHTS] = peft.export._digest(missing / WEIGHTS)
    (missing / CONFIG).write_text(json.dumps(record))
    with pytest.raises(peft.AdapterFileError, match=r"missing \['adapter/bias', 'lm_head/kernel'"):
        peft.load_trainable(missing)

    truncated = fresh("truncated")
    (truncated / WEIGHTS).write_bytes((truncated / WEIGHTS).read_bytes()[:40])
    record = json.loads((truncated / CONFIG).read_text())
    del record["sha256"]                       # even without a manifest: a clear error
    (truncated / CONFIG).write_text(json.dumps(record))
    with pytest.raises(peft.AdapterFileError, match=r"cannot read .*trainable.safetensors"):
        peft.load_trainable(truncated)

    bad_json = fresh("bad_json")
    (bad_json / CONFIG).write_text("{not json")
    with pytest.raises(peft.AdapterFileError, match=r"bad_json/trainable_config.json: not valid"):
        peft.load_trainable(bad_json)


def test_nan_is_refused_on_export_and_on_load(tmp_path):
    bad = {"adapter": {"kernel": np.array([1.0, np.nan], np.float32)}}
    with pytest.raises(ValueError, match="non-finite.*adapter/kernel"):
        peft.export_trainable(tmp_path / "nan", bad, {})
    assert not (tmp_path / "nan").exists()
    bf16 = {"adapter": {"kernel": jnp.array([1.0, np.inf], jnp.bfloat16)}}  # not np.floating
    with pytest.raises(ValueError, match="non-finite.*adapter/kernel"):
        peft.export_trainable(tmp_path / "nan", bf16, {})
    from safetensors.numpy import save_file

    path = tmp_path / "nan_on_disk"
    path.mkdir()
    save_file({"adapter/kernel": bad["adapter"]["kernel"]}, str(path / WEIGHTS))
    (path / CONFIG).write_text(json.dumps({"method": {}}))
    with pytest.raises(peft.AdapterFileError, match="non-finite values in.*adapter/kernel"):
        peft.load_trainable(path)


@pytest.mark.parametrize("name,family,new_name", [
    ("compacterpp", "AdapterMethod", "compacter++"), ("lora", "LoRAMethod", "lora"),
    ("bitfit", "BitFitMethod", "bitfit_projections"),
    ("prompt_tuning", "PromptTuning", "prompt_tuning")])
def test_exports_of_version_0_1_still_load(name, family, new_name):
    trained, meta = peft.load_trainable(LEGACY / name)
    method = peft.method_of_export(meta)
    assert type(method).__name__ == family and method.name == new_name
    model, params = peft.load_adapter(LEGACY / name)        # backbone: random:t5-tiny, seed 3
    trainable, _ = method.partition(params)
    got = traverse_util.flatten_dict(trainable)
    want = traverse_util.flatten_dict(trained)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), want[key])
    ids = np.ones((1, 5), np.int32)
    logits = model.apply({"params": params}, ids, ids, ids)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_load_adapter_refuses_an_export_that_does_not_fit(tmp_path):
    _, meta = peft.load_trainable(LEGACY / "compacterpp")
    trained, _ = peft.load_trainable(LEGACY / "compacterpp")
    flat = traverse_util.flatten_dict(trained)
    flat.pop(next(k for k in flat if k[-1] == "phm_left"))      # one adapter tensor gone
    method = peft.method_of_export(meta)
    peft.save_adapter(tmp_path / "partial", traverse_util.unflatten_dict(flat), method,
                      model="random:t5-tiny", init_seed=3)
    with pytest.raises(peft.AdapterFileError, match=r"does not fit .*missing \['.*phm_left'\]"):
        peft.load_adapter(tmp_path / "partial")


def test_a_partial_export_is_refused_in_the_scanned_layout_too():
    """`fit_export` (load_adapter's and the Predictor's) checks block by block before it
    stacks: a partial export is an AdapterFileError naming the tensor, not a pytree error."""
    from compacter_jax.peft.export import fit_export

    block = {"adapter": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones(3, np.float32)}}
    trained = {"encoder": {"block_0": block, "block_1": {"adapter": {"kernel": np.ones((2, 3))}}}}
    template = stack_blocks({"encoder": {"block_0": block, "block_1": block}})
    method = peft.get_method("compacter++")
    with pytest.raises(peft.AdapterFileError, match=r"out: the export does not fit t5-x with "
                       r"method compacter\+\+ \(scan_layers=True\): missing "
                       r"\['encoder/block_1/adapter/bias'\], unexpected \[\]"):
        fit_export(trained, template, path="out", backbone="t5-x", method=method,
                   scan_layers=True)
    trained["encoder"]["block_1"]["adapter"]["bias"] = np.zeros(3, np.float64)
    fitted = fit_export(trained, template, path="out", backbone="t5-x", method=method,
                        scan_layers=True)
    bias = fitted["encoder"]["blocks"]["adapter"]["bias"]
    assert bias.shape == (2, 3) and bias.dtype == np.float32   # stacked, cast to the model's
    np.testing.assert_array_equal(bias, [[1, 1, 1], [0, 0, 0]])
    with pytest.raises(peft.AdapterFileError, match=r"encoder/block_1/adapter/bias has shape "
                                                    r"\(4,\), the model expects \(3,\)"):
        trained["encoder"]["block_1"]["adapter"]["bias"] = np.zeros(4)
        fit_export(trained, template, path="out", backbone="t5-x", method=method,
                   scan_layers=True)


def test_manifest_shapes_and_loader_errors_name_the_path(tmp_path):
    """Item 5 / 12 of issue 12: every loader failure names the file and says what to do."""
    from safetensors.numpy import save_file

    def without_checksums(name):
        path = peft.export_trainable(tmp_path / name, TREE, {"method": {"family": "Method"}})
        record = json.loads((path / CONFIG).read_text())
        del record["sha256"]
        return path, record

    reshaped, record = without_checksums("reshaped")  # same names, another shape
    save_file({**{k: v for k, v in traverse_util.flatten_dict(TREE, sep="/").items()},
               "adapter/bias": np.ones(4, np.float32)}, str(reshaped / WEIGHTS))
    (reshaped / CONFIG).write_text(json.dumps(record))
    with pytest.raises(peft.AdapterFileError,
                       match=r"reshaped/trainable.safetensors: tensor 'adapter/bias' is "
                             r"float32\[4\], the manifest says float32\[3\]"):
        peft.load_trainable(reshaped)

    unknown, record = without_checksums("unknown_field")  # an unknown method field
    record["method"] = {**peft.get_method("compacter++").to_dict(), "foo": 3}
    (unknown / CONFIG).write_text(json.dumps(record))
    with pytest.raises(peft.AdapterFileError, match=r"unknown_field: the export's method does "
                                                    r"not build: unknown field\(s\) \['foo'\]"):
        peft.load_adapter(unknown, backbone="random:t5-tiny")

    listed, record = without_checksums("listed")
    record["sha256"] = ["not", "an", "object"]
    (listed / CONFIG).write_text(json.dumps(record))
    with pytest.raises(peft.AdapterFileError, match=r"listed/trainable_config.json: field "
                                                    r"'sha256' must be an object"):
        peft.load_trainable(listed)


# -- the export records its backbone (issue 20) -------------------------------------------------

@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for these tests: each load_adapter draws the same
    random:t5-tiny + Compacter++ (the seed is an argument), so it compiles the init once."""
    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("jax_cache")),
                "jax_persistent_cache_min_compile_time_secs": 0.0}
    before = {k: jax.config.values[k] for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


@pytest.fixture(scope="module")
def seven(compile_cache):
    """Compacter++ on random:t5-tiny drawn with PRNGKey(7), "trained" (moved) a little."""
    method = peft.get_method("compacter++", reduction_factor=8)
    model, params = peft.from_pretrained("random:t5-tiny", method, rng=jax.random.PRNGKey(7))
    trainable, frozen = method.partition(params)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.01, trainable)
    return method, model, params, trainable, frozen


def test_an_adapter_is_refused_by_a_backbone_it_was_not_trained_on(seven, tmp_path):
    """Before: an adapter saved from random:t5-tiny drawn with PRNGKey(7) reloaded onto seed 0
    without a word. Now the export records the backbone and load_adapter checks it."""
    method, model, params, trainable, frozen = seven
    with pytest.raises(ValueError, match=r"cannot record how to rebuild the backbone "
                                         r"random:t5-tiny: pass init_seed=.*backbone_params="):
        peft.save_adapter(tmp_path / "bare", trainable, method, model="random:t5-tiny")
    peft.save_adapter(tmp_path / "fp", trainable, method, model="random:t5-tiny",
                      backbone_params=frozen)
    with pytest.raises(peft.AdapterFileError,
                       match=r"trained on random:t5-tiny drawn with init_seed 0 \(backbone "
                             r"sha256:[0-9a-f]{64}\), but the backbone loaded is random:t5-tiny "
                             r"drawn with init_seed 0 \(sha256:"):
        peft.load_adapter(tmp_path / "fp")   # no seed recorded: drawn from 0, and refused
    # With the seed recorded it reloads onto the weights it was trained on, logits and all.
    peft.save_adapter(tmp_path / "seeded", trainable, method, model="random:t5-tiny",
                      init_seed=7, backbone_params=params)
    assert json.loads((tmp_path / "seeded" / CONFIG).read_text())["backbone_sha256"] == \
        peft.backbone_fingerprint(frozen, method)
    reloaded_model, reloaded = peft.load_adapter(tmp_path / "seeded")
    ids = np.arange(1, 7, dtype=np.int32)[None]
    want = model.apply({"params": method.combine(trainable, frozen)}, ids, ids * 0 + 1, ids)
    got = reloaded_model.apply({"params": reloaded}, ids, ids * 0 + 1, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_backbone_fingerprint_covers_exactly_the_weights_the_adapter_relies_on(seven):
    method, _, params, _, frozen = seven
    fp = peft.backbone_fingerprint(params, method)
    assert fp == peft.backbone_fingerprint(frozen, method)               # the frozen part
    assert fp == peft.backbone_fingerprint(stack_blocks(params), method)  # scanned layout
    flat = traverse_util.flatten_dict(params)
    ln = next(k for k in flat if k[-2] == "layer_norm")        # trained by Compacter++
    q = next(k for k in flat if k[-2] == "q")                  # frozen
    nudged = lambda key: traverse_util.unflatten_dict(         # noqa: E731
        {**flat, key: np.nextafter(np.asarray(flat[key]), np.inf)})
    assert peft.backbone_fingerprint(nudged(ln), method) == fp
    assert peft.backbone_fingerprint(nudged(q), method) != fp  # one ulp of one weight
    with pytest.raises(ValueError, match="lacks the backbone weights.*shared/embedding"):
        peft.backbone_fingerprint({"encoder": {}}, method)


def test_an_export_without_the_record_loads_with_a_warning(seven, tmp_path):
    """Exports written before the record existed keep loading (as before: seed 0), and say so;
    a name-only export of a named checkpoint warns when it is written."""
    method, _, _, trainable, _ = seven
    peft.export_trainable(tmp_path / "old", trainable,
                          {"method": method.to_dict(), "model": "random:t5-tiny"})
    with pytest.warns(UserWarning, match=r"does not record its backbone's fingerprint.*loaded "
                                         r"onto random:t5-tiny drawn with init_seed 0"):
        peft.load_adapter(tmp_path / "old")
    with pytest.warns(UserWarning, match=r"records the backbone by name only \(t5-base\)"):
        peft.save_adapter(tmp_path / "named", trainable, method, model="t5-base")


def test_backbone_fields_and_tensor_dtypes_are_checked_naming_the_file(tmp_path):
    """Issue 19: an export whose init_seed is not a PRNGKey seed (a string, 2**70, which
    PRNGKey would refuse or silently truncate) or whose tensors are integers (without a
    manifest they used to load cast to float32) is refused naming the file."""
    from safetensors.numpy import save_file

    for seed in ("abc", 2**70, 2**32, -1, True):
        path = peft.export_trainable(tmp_path / f"seed_{seed}", TREE,
                                     {"method": {"family": "Method"}, "init_seed": seed})
        with pytest.raises(peft.AdapterFileError,
                           match=rf"seed_{seed}/trainable_config.json: init_seed "
                                 rf"{re.escape(repr(seed))} is not an integer in 0..4294967295"):
            peft.load_trainable(path)
    with pytest.raises(ValueError, match=r"save_adapter\('.*/x'\): init_seed 'abc' is not"):
        peft.save_adapter(tmp_path / "x", TREE, peft.get_method("bitfit"),
                          model="random:t5-tiny", init_seed="abc")
    assert peft.load_trainable(peft.export_trainable(
        tmp_path / "seed_ok", TREE, {"init_seed": 2**32 - 1}))[1]["init_seed"] == 2**32 - 1

    no_manifest = tmp_path / "int64"
    no_manifest.mkdir()
    save_file({"adapter/kernel": np.arange(6, dtype=np.int64).reshape(2, 3)},
              str(no_manifest / WEIGHTS))
    (no_manifest / CONFIG).write_text(json.dumps({"method": {}}))
    with pytest.raises(peft.AdapterFileError, match=r"int64/trainable.safetensors: tensors "
                                                    r"\['adapter/kernel \(int64\)'\] are not "
                                                    r"floating point"):
        peft.load_trainable(no_manifest)
    with pytest.raises(ValueError, match=r"non-floating-point tensors \['adapter/kernel'\]"):
        peft.export_trainable(tmp_path / "ints", {"adapter": {"kernel": np.ones(2, np.int32)}},
                              {})
