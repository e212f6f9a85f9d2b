"""Imports point one way: each part of the package imports only parts below it (docs/architecture.md).

Read from the source (lazy imports inside functions included), so a dependency cannot hide in a
function body. The exceptions still to be removed are listed, each with why, so the list can only
shrink: a listed import that no longer exists fails the test too.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "retinaface_jax"
# higher imports lower; the same rank imports only within its own part
RANKS = {
    "base": 0,  # config, box_utils, priors, mean_subtraction, image_header, user_cache, ...
    "models": 1,
    "loss": 1,
    "backends": 2,
    "weights": 3,
    "data": 3,
    "inference": 4,
    "train": 5,
    "evaluate": 5,
    "convert": 6,
    "export": 6,
}
# (importer, imported) still to be removed, each with why (none left)
PENDING: set[tuple[str, str]] = set()


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANKS:
        return parts[1]
    return "base"


def _imports() -> set[tuple[str, str]]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                # "from retinaface_jax.backends.native import ops": the submodule is the import
                subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
                names = subs or [base]
            else:
                continue
            for name in names:
                if name.startswith("retinaface_jax.") and _is_module(name):
                    found.add((module, name))
    return found


def _is_module(name: str) -> bool:
    rel = PACKAGE.parent.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def test_imports_point_downward():
    wrong = set()
    for importer, imported in _imports():
        a, b = _part(importer), _part(imported)
        if a != b and RANKS[b] >= RANKS[a]:
            wrong.add((importer, imported))
    assert wrong - PENDING == set(), "imports pointing up or sideways"
    assert PENDING - wrong == set(), "gone from the code: remove from PENDING"


def test_loss_and_geometry_import_no_backend():
    for importer, imported in _imports():
        if importer in ("retinaface_jax.loss", "retinaface_jax.box_utils", "retinaface_jax.priors"):
            assert _part(imported) in ("base", "models"), (importer, imported)


def test_models_import_nothing_but_models_and_config():
    """Importing the reference model in a fresh interpreter loads no other part of the package."""
    import subprocess
    import sys

    code = (
        "import sys, retinaface_jax.models.retinaface\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('retinaface_jax')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.split()
    # the package's own __init__ (its lazy public names) runs first, whatever is imported
    allowed = ("retinaface_jax", "retinaface_jax.lazy_exports", "retinaface_jax.config")
    allowed += ("retinaface_jax.configs",)
    outside = [m for m in out if m not in allowed and not m.startswith("retinaface_jax.models")]
    assert "retinaface_jax.models.retinaface" in out and outside == []


ACCELERATION = ("custom_vjp", "custom_jvp", "jax.ffi", "ffi_call", "shard_map", "ContextVar")


def test_acceleration_lives_in_the_backends():
    """No custom derivatives, FFI calls or shard_map outside ``backends``; the models hold none of
    those and no hidden trace-time state (ContextVar) either."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        text = path.read_text()
        for word in ACCELERATION:
            if word == "ContextVar" and not rel.startswith("models/"):
                continue  # (a CLI option's override outside the model is fine)
            assert word not in text or rel.startswith("backends/"), (rel, word)
