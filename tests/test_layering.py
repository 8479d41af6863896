"""The package's imports point one way: models <- peft <- train <- experiments, with data
beside train (it may use models); `__init__` files hold no logic. Read from the source with
`ast`, so function-level imports count too."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compacter_jax"
# Which subpackages each may import (besides itself and the root-level helpers).
ALLOWED = {
    "models": set(),
    "peft": {"models"},
    "data": {"models"},
    "train": set(),
    "experiments": {"models", "peft", "data", "train", "serve"},
    "serve": {"models", "peft", "data"},   # compacter_jax/serve.py: mixed-task serving
}
HELPERS = {"paths", "host", "tokenizer", "hub", "atomic"}   # root-level modules any layer may use
CLIS = {"params"}                          # root-level tools, above peft


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "experiments":
        return "experiments"
    if parts[0] != "compacter_jax" or len(parts) < 2:
        return None
    return parts[1]


def test_imports_point_one_way():
    bad = []
    files = [(p, _layer("compacter_jax." + p.relative_to(PACKAGE).parts[0].removesuffix(".py")))
             for p in PACKAGE.rglob("*.py")]
    files += [(p, "experiments") for p in (ROOT / "experiments").rglob("*.py")]
    for path, layer in files:
        if layer not in ALLOWED:
            continue
        for lineno, module in _imports(path):
            target = _layer(module)
            if target is None or target == layer or target in HELPERS:
                continue
            if target in CLIS and layer == "experiments":
                continue
            if target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{lineno}: {layer} imports {module}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_helpers_import_no_layer():
    for name in HELPERS:
        for lineno, module in _imports(PACKAGE / f"{name}.py"):
            target = _layer(module)
            assert target is None or target in HELPERS, f"{name}.py:{lineno} imports {module}"


def test_init_files_only_re_export():
    for init in PACKAGE.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        for node in tree.body:
            ok = isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
                isinstance(node, ast.Assign) and all(
                    isinstance(t, ast.Name) and t.id in ("__all__", "__version__")
                    for t in node.targets))
            assert ok, f"{init.relative_to(ROOT)}:{node.lineno}: logic in an __init__ file"


def test_the_public_api_is_listed():
    import compacter_jax as cj

    assert sorted(cj.__all__) == sorted(set(cj.__all__))
    for name in cj.__all__:
        assert hasattr(cj, name), name
    for name in ("from_pretrained", "get_method", "load_adapter", "save_adapter", "split",
                 "merge", "make_train_step", "make_eval_step", "PHMLinear", "Adapter"):
        assert name in cj.__all__


# Configs are data (issue 19): a file under experiments/configs/ builds an ml_collections
# ConfigDict and nothing else. It may import ml_collections, the PEFT method registry (for the
# `peft` placeholders and to name a bad method early), a sibling config it extends, and
# `__future__`; no other package, not even the standard library (a config that needs logic,
# I/O or a library belongs in a module of its own, as experiments/paper.py).
CONFIG_IMPORTS = {"__future__", "ml_collections", "compacter_jax.peft", "experiments.configs"}


def _config_import_allowed(module: str) -> bool:
    return any(module == ok or module.startswith(ok + ".") for ok in CONFIG_IMPORTS)


def test_configs_import_only_ml_collections_and_the_registry():
    bad = []
    for path in sorted((ROOT / "experiments" / "configs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # a relative import: a sibling config
                    continue
                # `from compacter_jax import peft` imports compacter_jax.peft.
                modules = [node.module if _config_import_allowed(node.module)
                           else f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {m}"
                    for m in modules if not _config_import_allowed(m)]
    assert not bad, ("configs are data: import only " + ", ".join(sorted(CONFIG_IMPORTS))
                     + "\n" + "\n".join(bad))
