"""Every third-party module the package imports is a declared dependency of the bare install.

A module that only a test extra happens to pull in (flatbuffers via onnxruntime, pillow via
matplotlib) passes every test and fails on a user's ``pip install -e .``: this test reads the
package's imports from its source and the declared requirements from pyproject.toml.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib

from conftest import REPO

# imported by a dependency on our behalf, not by our source: jax.export's serialisation
# (the detector's program cache) needs flatbuffers and imports it lazily
IMPLICIT = {"flatbuffers": "jax.export serialisation"}
# imported only by optional features, each behind its extra
OPTIONAL = {"matplotlib": "plot", "onnx": "export", "onnxruntime": "export"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {_normalise(re.split(r"[<>=!~; \[]", r, maxsplit=1)[0]) for r in reqs}

    extras = {k: names(v) for k, v in project.get("optional-dependencies", {}).items()}
    return names(project["dependencies"]), extras


def _imported_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / "retinaface_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                if top not in sys.stdlib_module_names and top != "retinaface_jax":
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_declared():
    declared, extras = _requirements()
    distributions = metadata.packages_distributions()
    missing = []
    for module, files in sorted(_imported_modules().items()):
        dists = {_normalise(d) for d in distributions.get(module, [module])}
        if module in OPTIONAL:
            if not dists & extras.get(OPTIONAL[module], set()):
                missing.append(
                    f"{module} (extra [{OPTIONAL[module]}], imported in {sorted(files)})"
                )
        elif not dists & declared:
            missing.append(f"{module} (imported in {sorted(files)})")
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_implicit_runtime_modules_are_declared():
    declared, _ = _requirements()
    missing = [f"{m} ({why})" for m, why in IMPLICIT.items() if _normalise(m) not in declared]
    assert not missing, f"needed at run time but not declared: {missing}"
