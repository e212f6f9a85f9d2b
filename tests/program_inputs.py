"""Placeholder inputs for tracing the train step and the detector's program (tests that inspect
what a program contains, not what it computes)."""

from __future__ import annotations

import numpy as np


def empty_batch(n: int, size: int, faces: int = 4, dtype=np.float32) -> dict[str, np.ndarray]:
    """A train-step batch of ``n`` blank ``size``² images without faces."""
    return {
        "image": np.zeros((n, size, size, 3), dtype),
        "targets": np.zeros((n, faces, 15), np.float32),
        "valid": np.zeros((n, faces), bool),
    }


def trace_detector_program(
    detector, images: np.ndarray, *, k: int = 10, max_keep: int = 5, masked: bool = False
):
    """The detector's jitted program traced for ``images [B, H, W, 3]`` (every image H x W, scale
    1, thresholds 0.5 / 0.4); ``.lower()`` it for this or another platform."""
    b, h, w = images.shape[:3]
    return detector._program.trace(
        detector._weights,
        images,
        np.tile(np.array([[h, w]], np.int32), (b, 1)),
        np.ones((b,), np.float32),
        np.float32(0.5),
        np.float32(0.4),
        k=k,
        max_keep=max_keep,
        masked=masked,
    )
