"""Shared test fixtures.

``shared`` resolves the read-only data directory (``$RETINAFACE_SHARED``, default ``../shared``
beside the repository). Tests that need it skip with a clear message when it is absent, and fail
instead when ``RETINAFACE_REQUIRE_SHARED=1`` (as in CI).

JAX is configured with 4 simulated CPU devices before it initialises, so data-parallel tests can
build a 4-device mesh; single-device code runs on device 0 as usual.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 4)

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The shared data directory, or None when it is not there."""
    root = Path(os.environ.get("RETINAFACE_SHARED", REPO.parent / "shared"))
    return root if (root / "golden").is_dir() else None


@pytest.fixture(scope="session")
def shared() -> Path:
    """Path to ../shared (data/, golden/, anchors/); skip or fail when missing."""
    root = shared_dir()
    if root is None:
        msg = (
            "shared data not found: set RETINAFACE_SHARED to the directory holding data/, golden/ "
            "and anchors/ (default ../shared beside the repository)"
        )
        if os.environ.get("RETINAFACE_REQUIRE_SHARED") == "1":
            pytest.fail(msg + " [RETINAFACE_REQUIRE_SHARED=1]")
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def golden(shared: Path):
    """Loader for golden/*.npz files: ``golden('priors')`` -> dict of numpy arrays."""
    cache: dict[str, dict[str, np.ndarray]] = {}

    def load(name: str) -> dict[str, np.ndarray]:
        if name not in cache:
            with np.load(shared / "golden" / f"{name}.npz", allow_pickle=False) as f:
                cache[name] = {k: f[k] for k in f.files}
        return cache[name]

    return load
