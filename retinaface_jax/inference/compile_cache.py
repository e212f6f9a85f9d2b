"""JAX's persistent compilation cache, on by default under the user cache dir.

A second ``python detect.py photo.jpg`` then loads compiled programs from disk instead of
recompiling. Location: ``$RETINAFACE_CACHE/jax_cache`` (default ``~/.cache/retinaface_jax/jax_cache``).
Set ``RETINAFACE_JAX_CACHE=0`` to leave JAX's cache settings alone; a cache dir the user already
configured (``jax_compilation_cache_dir``) is never replaced.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from retinaface_jax.user_cache import cache_dir


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on the persistent compilation cache (idempotent); returns its dir or None if disabled."""
    if os.environ.get("RETINAFACE_JAX_CACHE", "1") == "0":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and path is None:
        return Path(current)
    target = Path(path) if path is not None else cache_dir() / "jax_cache"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # read-only home: run without the cache rather than fail
    jax.config.update("jax_compilation_cache_dir", str(target))
    # cache every program (the defaults skip programs that compile in under a second)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return target
