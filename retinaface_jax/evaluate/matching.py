"""Box overlap and detection-to-face matching shared by the WIDER FACE and FDDB evaluations.

Everything is vectorised per image in numpy float64 (evaluation is exact bookkeeping, not a jitted
hot path): one ``[N, K]`` IoU matrix, one argmax per detection, and a first-hit rule instead of the
per-detection Python loop of the original evaluation code.
"""

from __future__ import annotations

import numpy as np


def xywh_to_x1y1x2y2(boxes: np.ndarray) -> np.ndarray:
    """``(x, y, w, h)`` -> ``(x1, y1, x1 + w, y1 + h)`` (float64 copy, no ``-1``, as WIDER)."""
    out = np.array(boxes, dtype=np.float64, copy=True).reshape(-1, 4)
    out[:, 2] += out[:, 0]
    out[:, 3] += out[:, 1]
    return out


def box_iou(boxes: np.ndarray, queries: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    """Element-wise (broadcast) IoU of ``x1, y1, x2, y2`` boxes ``[..., 4]``.

    ``pixel_offset=1`` is the inclusive-pixel convention of the official WIDER FACE tool (widths are
    ``x2 - x1 + 1``); the union is summed in the same order as that tool (``area_box + area_query -
    intersection``) so results agree bit for bit. Non-overlapping pairs are exactly 0.
    """
    b = np.asarray(boxes, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    iw = np.minimum(b[..., 2], q[..., 2]) - np.maximum(b[..., 0], q[..., 0]) + pixel_offset
    ih = np.minimum(b[..., 3], q[..., 3]) - np.maximum(b[..., 1], q[..., 1]) + pixel_offset
    area_b = (b[..., 2] - b[..., 0] + pixel_offset) * (b[..., 3] - b[..., 1] + pixel_offset)
    area_q = (q[..., 2] - q[..., 0] + pixel_offset) * (q[..., 3] - q[..., 1] + pixel_offset)
    overlap = (iw > 0) & (ih > 0)
    inter = np.where(overlap, iw * ih, 0.0)
    union = area_b + area_q - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def pairwise_iou(boxes: np.ndarray, queries: np.ndarray, pixel_offset: float = 0.0) -> np.ndarray:
    """IoU ``[N, K]`` between ``boxes [N,4]`` and ``queries [K,4]`` (see :func:`box_iou`)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    q = np.asarray(queries, dtype=np.float64).reshape(-1, 4)
    return box_iou(b[:, None, :], q[None, :, :], pixel_offset)


def best_matches(iou: np.ndarray, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per detection (row): the index of its highest-IoU face (first on ties) and whether that
    IoU reaches ``iou_threshold``."""
    best = np.argmax(iou, axis=1)
    hit = iou[np.arange(iou.shape[0]), best] >= iou_threshold
    return best, hit


def first_hits(best: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Mask of the detections that are the first (in row order) candidate for their face.

    This is the vectorised form of "a face counts once, for the first detection that reaches it":
    later detections whose best face was already reached get ``False``.
    """
    out = np.zeros(best.shape[0], dtype=bool)
    rows = np.flatnonzero(candidate)
    if rows.size:
        _, first = np.unique(best[rows], return_index=True)
        out[rows[first]] = True
    return out
