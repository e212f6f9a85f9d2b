"""Where the package keeps what it makes once per user: downloaded weights, converted native
checkpoints, the compiled native kernels, JAX's compilation cache and exported programs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$RETINAFACE_CACHE`` or ``$XDG_CACHE_HOME/retinaface_jax`` (default ``~/.cache/...``)."""
    env = os.environ.get("RETINAFACE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "retinaface_jax"
