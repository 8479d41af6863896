"""`pip install .` (not editable) into a clean virtual environment gives a working package: it
imports from any directory, without this checkout on the path, and finds its embedded backbone
and that backbone's own tokenizer as package data, with no data folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__",
                               ".pytest_cache", "*.ipynb")


def _venv_with_this_environments_deps(where: Path) -> Path:
    """A venv without pip whose only extra path is this interpreter's site-packages (the
    dependencies, and pip/setuptools to build with); its own site-packages comes first."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True)
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.long  # builds a 62 MB wheel: ~70 s on the shared 2-core machine
def test_non_editable_install_finds_its_backbone_and_tokenizer(tmp_path):
    source = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info next to it
    shutil.copytree(ROOT, source, symlinks=True, ignore=_SKIP)
    python = _venv_with_this_environments_deps(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "COMPACTER_CHECKPOINTS_DIR")}
    env.update(COMPACTER_DATA_DIR=str(tmp_path / "no-data"), HF_HUB_OFFLINE="1")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "--ignore-installed", str(source)],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    shutil.rmtree(source)  # the installed package alone must do
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = textwrap.dedent("""
        import json, compacter_jax
        from compacter_jax.models.hf_io import load_config, model_dir
        from compacter_jax.paths import checkpoints_dir
        from compacter_jax.tokenizer import tokenizer_for_model
        folder = model_dir("t5-mini-glue")
        config = load_config("t5-mini-glue", check_weights=True)
        tok = tokenizer_for_model(folder, vocab_size=config.vocab_size)
        print(json.dumps({"package": compacter_jax.__file__, "folder": str(folder),
                          "checkpoints": str(checkpoints_dir()), "d_model": config.d_model,
                          "eos": tok("a film").input_ids[-1], "vocab": len(tok)}))
    """)
    out = subprocess.run([str(python), "-c", check], env=env, cwd=elsewhere,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    site = str(tmp_path / "venv")
    assert got["package"].startswith(site), got  # the installed copy, not this checkout
    assert got["folder"].startswith(site) and got["folder"].endswith(
        "compacter_jax/checkpoints/t5-mini-glue")
    assert got["d_model"] > 0 and got["eos"] == 1 and got["vocab"] >= 1000
    # The CLI finds its default config next to the installed module (exit 2: a bad value).
    cli = subprocess.run([str(python), "-m", "experiments.glue", "--workdir", "run",
                          "--config.batch_size=0"], env=env, cwd=elsewhere, capture_output=True,
                         text=True)
    assert cli.returncode == 2, cli.stderr[-3000:]
    assert cli.stderr.strip().splitlines()[-1] == \
        "error: --config.batch_size=0: must be a positive integer"


def test_package_data_holds_the_embedded_backbone_and_its_tokenizer():
    """The fast version of the test above: pyproject's package data names the files that
    `checkpoints_dir()` finds (in a checkout, through the compacter_jax/checkpoints link)."""
    import tomllib

    from compacter_jax.paths import checkpoints_dir

    package = ROOT / "compacter_jax"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["compacter_jax"]
    shipped = {p.relative_to(package).as_posix() for pattern in patterns
               for p in package.glob(pattern)}
    for name in ("config.json", "model.safetensors", "spiece.model"):
        assert f"checkpoints/t5-mini-glue/{name}" in shipped
    assert (package / "checkpoints").resolve() == (ROOT / "checkpoints").resolve()
    if not os.environ.get("COMPACTER_CHECKPOINTS_DIR"):
        assert checkpoints_dir() == (ROOT / "checkpoints").resolve()
