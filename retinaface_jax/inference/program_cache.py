"""Exported detection programs on disk, so a new process skips tracing and lowering.

JAX's persistent compilation cache (``compile_cache``) saves the XLA compile, but its key is the
lowered program, so every new process still traces the model and lowers it to StableHLO before
it can look the executable up, a large part of a first ``detect()``'s time. Here each program is exported once (``jax.export``: StableHLO bytecode plus its
pytree structure, nothing pickled) to ``<cache>/programs/<key>.jaxexport`` and later processes
call the deserialised program, whose compile the compilation cache then supplies (same results,
bit for bit).

The key covers everything the program depends on: the jax/jaxlib versions, the platform, a hash
of this package's source files (an edited checkout re-exports), the compiler options, the shapes
and dtypes of the arguments (weights included) and the static arguments. A file that does not
load is ignored and rewritten; a cache dir that cannot be written is not an error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax import export

from retinaface_jax.backends.native.build import TARGETS

log = logging.getLogger(__name__)

SUFFIX = ".jaxexport"


@functools.cache
def source_digest() -> str:
    """sha256 over this package's ``*.py`` and ``*.cc`` files (relative path and content)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc")]):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _signature(tree: Any) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
    """``(shape, dtype)`` of every leaf: what a program's arguments look like. (The dtype object
    itself: numpy formats ``str(dtype)`` in Python, slowly, for every leaf on every ``detect()``
    call.)"""
    return tuple((tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(tree))


class ExportedPrograms:
    """Call ``jitted(*args, **static)`` through programs exported to ``directory``.

    ``jitted`` is a ``jax.jit`` function whose keyword arguments are its static arguments;
    ``context`` is anything else that shapes the program (e.g. the model config as text).
    The first positional argument is fixed for the object's life (the weights), so its
    signature is computed once.
    """

    def __init__(
        self,
        jitted: Callable[..., Any],
        directory: Path,
        fixed: Any,
        context: str,
        compiler_options: dict[str, str] | None,
    ):
        self.jitted, self.directory = jitted, Path(directory)
        self.compiler_options = compiler_options
        device = jax.devices()[0]
        self._base = "\n".join(
            [
                f"jax {jax.__version__} jaxlib {jaxlib.__version__}",
                f"{device.platform} {device.device_kind}",
                source_digest(),
                repr(sorted((compiler_options or {}).items())),
                context,
                repr(_signature(fixed)),
            ]
        )
        self._programs: dict[tuple, Callable[..., Any]] = {}
        self._lock = threading.Lock()  # first calls from several threads export each key once

    def __call__(self, *args: Any, **static: Any) -> Any:
        rest = args[1:]
        key = (_signature(rest), tuple(sorted(static.items())))
        program = self._programs.get(key)
        if program is None:
            with self._lock:
                program = self._programs.get(key)
                if program is None:
                    program = self._programs[key] = self._load_or_export(args, static, key)
        return program(*args)

    def path_for(self, key: tuple) -> Path:
        digest = hashlib.sha256(f"{self._base}\n{key!r}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}{SUFFIX}"

    def _load_or_export(self, args: tuple, static: dict, key: tuple) -> Callable[..., Any]:
        path = self.path_for(key)
        exported = None
        if path.is_file():
            try:
                exported = export.deserialize(bytearray(path.read_bytes()))
            except Exception as err:  # a truncated or foreign file: export again
                log.warning("ignoring unreadable exported program %s (%s)", path, err)
        if exported is None:
            # our native CPU kernels are custom calls, which export refuses unless told
            allowed = [export.DisabledSafetyCheck.custom_call(name) for name in TARGETS]
            exported = export.export(self.jitted, disabled_checks=allowed)(*args, **static)
            _write_atomic(path, exported.serialize())
        return jax.jit(exported.call, compiler_options=self.compiler_options)


def _write_atomic(path: Path, data: bytes | bytearray) -> None:
    """Write via a temporary file and a rename; a failure only costs the cache entry."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        log.warning("could not cache the exported program at %s (%s)", path, err)
