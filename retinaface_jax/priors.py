"""Anchor (prior) boxes of RetinaFace, in the original's order, computed once per image size.

Each FPN level ``k`` with stride ``steps[k]`` covers a ``ceil(H/step) x ceil(W/step)`` grid; every
cell carries one square anchor per entry of ``min_sizes[k]``. Rows of the result are ordered by
(level, row, column, anchor size) exactly as the original ``PriorBox``, so predictions line up.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from retinaface_jax.config import RetinaFaceConfig

__all__ = ["prior_box"]


def prior_box(cfg: RetinaFaceConfig, image_size: tuple[int, int]) -> np.ndarray:
    """Priors ``[P, 4]`` float32 ``(cx, cy, w, h)`` normalised by the image width/height.

    ``image_size`` is ``(H, W)`` in pixels. The result is cached per (min_sizes, steps, clip, H, W)
    and returned read-only; copy it if you need to modify it.
    """
    size = tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, int | np.integer) and s > 0 for s in size):
        raise ValueError(f"prior_box: image_size must be (H, W) positive ints, got {image_size!r}")
    h, w = int(size[0]), int(size[1])
    return _prior_box_cached(cfg.min_sizes, cfg.steps, bool(cfg.clip), h, w)


@functools.lru_cache(maxsize=64)
def _prior_box_cached(
    min_sizes: tuple[tuple[int, ...], ...], steps: tuple[int, ...], clip: bool, h: int, w: int
) -> np.ndarray:
    levels = []
    for sizes, step in zip(min_sizes, steps, strict=True):
        rows, cols = math.ceil(h / step), math.ceil(w / step)
        # float64 like the original's Python arithmetic, cast to float32 at the end
        cx = (np.arange(cols, dtype=np.float64) + 0.5) * step / w  # [cols]
        cy = (np.arange(rows, dtype=np.float64) + 0.5) * step / h  # [rows]
        sk = np.asarray(sizes, dtype=np.float64)
        grid = np.empty((rows, cols, len(sizes), 4), dtype=np.float64)
        grid[..., 0] = cx[None, :, None]
        grid[..., 1] = cy[:, None, None]
        grid[..., 2] = sk / w
        grid[..., 3] = sk / h
        levels.append(grid.reshape(-1, 4))
    out = np.concatenate(levels, axis=0).astype(np.float32)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    out.flags.writeable = False
    return out
