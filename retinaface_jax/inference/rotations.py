"""Rotated copies for faces at 90/180/270 degrees (``Detector(rotations=...)``): pure numpy.

RetinaFace finds upright faces. With ``rotations=(0, 90, 180, 270)`` the detector also runs
copies of each input rotated counterclockwise by those angles (``np.rot90``), maps each copy's
detections back to input pixels (:func:`map_rows_back`) and merges all copies with one greedy NMS
(:func:`merge_rows`): the original ``py_cpu_nms`` arithmetic (float32, ``+1`` pixel areas),
highest score first, so a face found in several copies keeps its best-scoring detection.

Geometry: coordinates are continuous (pixel column ``j`` spans ``[j, j + 1)``, as the priors'
centres ``(j + 0.5) * step`` imply), so a quarter turn maps a box to an axis-aligned box exactly
and a point ``(x, y)`` of a ``width x height`` input rotated by 90 degrees lands at
``(y, width - x)``. Landmarks keep the detector's order: the copy in which the face is upright
labelled them, so ``left_eye`` stays the eye that is on the image-left side when the face is
upright (the subject's right eye), wherever it lies in the input. That is what alignment needs
(``align.align_faces`` then returns an upright crop); re-ordering by input x would mirror the
labels of upside-down faces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def validate_rotations(rotations: Any) -> tuple[int, ...] | None:
    """``rotations`` as a tuple of angles in ``{0, 90, 180, 270}`` (negative or >= 360 angles
    wrap), or None when there is nothing to rotate (None or just 0: the plain detector).

    A ValueError naming ``rotations`` for a non-integer, an angle that is not a multiple of 90,
    an empty list or the same angle twice (after wrapping).
    """
    if rotations is None:
        return None
    if isinstance(rotations, str | bytes) or not isinstance(rotations, Sequence):
        raise ValueError(f"rotations: expected a sequence of angles, got {rotations!r}")
    angles: list[int] = []
    for a in rotations:
        if isinstance(a, bool) or not isinstance(a, int | np.integer):
            raise ValueError(f"rotations: expected integer angles in degrees, got {a!r}")
        if a % 90:
            raise ValueError(f"rotations: angles must be multiples of 90 degrees, got {a}")
        if int(a) % 360 in angles:
            raise ValueError(f"rotations: angle {a} is given twice (angles wrap at 360)")
        angles.append(int(a) % 360)
    if not angles:
        raise ValueError("rotations: expected at least one angle, got an empty sequence")
    return None if angles == [0] else tuple(angles)


def rotate_image(image: np.ndarray, angle: int) -> np.ndarray:
    """``image [h, w, ...]`` rotated counterclockwise by ``angle`` (a multiple of 90): a view."""
    return np.rot90(image, k=(angle // 90) % 4)


def map_points_back(points: np.ndarray, angle: int, height: float, width: float) -> np.ndarray:
    """Points ``[..., 2]`` ``(x, y)`` of a copy rotated by ``angle`` -> the unrotated input's.

    ``height x width``: the unrotated input's extent, in the units of ``points``.
    """
    p = np.asarray(points, dtype=np.float64)
    x, y = p[..., 0], p[..., 1]
    k = (angle // 90) % 4
    if k == 0:
        back = (x, y)
    elif k == 1:  # forward: (x, y) -> (y, width - x)
        back = (width - y, x)
    elif k == 2:  # forward: (x, y) -> (width - x, height - y)
        back = (width - x, height - y)
    else:  # forward: (x, y) -> (height - y, x)
        back = (y, height - x)
    return np.stack(back, axis=-1)


def map_rows_back(rows: np.ndarray, angle: int, height: float, width: float) -> np.ndarray:
    """Detection rows ``[K, 15]`` (box, score, 5 landmarks) of a copy rotated by ``angle`` ->
    rows in the unrotated ``height x width`` input: each box's corners mapped back and re-sorted
    (``x1 <= x2``, ``y1 <= y2``), landmarks mapped point by point in the detector's order."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, 15)
    if angle % 360 == 0:
        return rows.copy()
    corners = map_points_back(rows[:, :4].reshape(-1, 2, 2), angle, height, width)
    out = np.empty_like(rows)
    out[:, 0:2] = corners.min(axis=1)
    out[:, 2:4] = corners.max(axis=1)
    out[:, 4] = rows[:, 4]
    out[:, 5:15] = map_points_back(rows[:, 5:15].reshape(-1, 5, 2), angle, height, width).reshape(
        -1, 10
    )
    return out


def greedy_nms(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Indices kept by the original ``py_cpu_nms`` (float32, ``+1`` pixel areas, a box survives
    if its IoU with every kept box is ``<= threshold``), visiting ``rows`` by score descending
    (ties: earlier row first)."""
    boxes = np.asarray(rows[:, :4], dtype=np.float32)
    x1, y1, x2, y2 = boxes.T
    one = np.float32(1)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(-np.asarray(rows[:, 4], dtype=np.float32), kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(
            np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one
        )
        h = np.maximum(
            np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one
        )
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            ovr = inter / (areas[i] + areas[rest] - inter)
        order = rest[ovr <= threshold]
    return np.asarray(keep, dtype=np.int64)


def merge_rows(
    copies: Sequence[np.ndarray], threshold: float, keep_top_k: int | None
) -> np.ndarray:
    """Rows of every copy (already in input pixels) -> one ``[K, 15]`` float32 set: greedy NMS
    over all of them (:func:`greedy_nms`), highest score first, at most ``keep_top_k``."""
    rows = np.concatenate([np.asarray(c, dtype=np.float32).reshape(-1, 15) for c in copies])
    keep = greedy_nms(rows, threshold)
    if keep_top_k is not None:
        keep = keep[:keep_top_k]
    return rows[keep]


def merge_rotations(
    copies: Sequence[np.ndarray],
    angles: Sequence[int],
    shape_hw: tuple[int, int],
    resize: float,
    threshold: float,
    keep_top_k: int | None,
) -> np.ndarray:
    """One image's detections: ``copies[i]`` are the rows (input pixels) found in its prepared
    (resized) image of ``shape_hw`` rotated by ``angles[i]``; mapped back and merged.

    Copies are rotated after the resize, so the input's extent in input pixels is
    ``shape_hw / resize`` (the resized extent that the rotation turned about).
    """
    height, width = shape_hw[0] / resize, shape_hw[1] / resize
    mapped = [
        map_rows_back(rows, angle, height, width)
        for rows, angle in zip(copies, angles, strict=True)
    ]
    return merge_rows(mapped, threshold, keep_top_k)


def parse_rotations(text: str) -> tuple[int, ...] | None:
    """``detect.py --rotations``: comma-separated angles (``"0,90,180,270"``), validated by
    :func:`validate_rotations`; an ``argparse`` type error naming the problem otherwise."""
    import argparse

    try:
        angles = [int(part) for part in text.split(",")]
        return validate_rotations(angles)
    except ValueError as e:
        msg = str(e) if str(e).startswith("rotations:") else f"expected integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
