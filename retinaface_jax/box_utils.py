"""Box geometry and the SSD-style box / landmark coding of RetinaFace, in jnp.

Every function works on arrays with any number of leading (batch) axes; the last axis holds the
coordinates. Boxes are point form ``(x1, y1, x2, y2)`` or centre form ``(cx, cy, w, h)``; priors
are centre form. ``variances`` is the config's ``variance`` pair, passed explicitly. The arithmetic
follows the original's order of operations so float32 results agree with it bit for bit where
possible.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "point_form",
    "center_size",
    "intersect",
    "jaccard",
    "encode",
    "decode",
    "encode_landm",
    "decode_landm",
]

Array = jax.Array


def point_form(boxes: Array) -> Array:
    """``(cx, cy, w, h)`` -> ``(x1, y1, x2, y2)``; shape ``[..., 4]``."""
    boxes = jnp.asarray(boxes)
    half = boxes[..., 2:] / 2
    return jnp.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def center_size(boxes: Array) -> Array:
    """``(x1, y1, x2, y2)`` -> ``(cx, cy, w, h)``; shape ``[..., 4]``."""
    boxes = jnp.asarray(boxes)
    return jnp.concatenate(
        [(boxes[..., 2:] + boxes[..., :2]) / 2, boxes[..., 2:] - boxes[..., :2]], axis=-1
    )


def _pairwise_coords(box_a: Array, box_b: Array) -> tuple[list[Array], list[Array]]:
    """The four coordinates of ``box_a [..., A, 4]`` as ``[..., A, 1]`` and of ``box_b`` as
    ``[..., 1, B]`` arrays. Working per coordinate (not on ``[..., 2]`` pairs) lets XLA fuse the
    pairwise ``[..., A, B]`` arithmetic into plain vectorised loops (much faster on CPU)."""
    a = jnp.asarray(box_a)
    b = jnp.asarray(box_b)
    return [a[..., :, None, i] for i in range(4)], [b[..., None, :, i] for i in range(4)]


def _intersect(a: list[Array], b: list[Array]) -> Array:
    iw = jnp.maximum(jnp.minimum(a[2], b[2]) - jnp.maximum(a[0], b[0]), 0)
    ih = jnp.maximum(jnp.minimum(a[3], b[3]) - jnp.maximum(a[1], b[1]), 0)
    return iw * ih


def intersect(box_a: Array, box_b: Array) -> Array:
    """Pairwise intersection areas: ``[..., A, 4] x [..., B, 4] -> [..., A, B]``.

    Boxes with negative extent intersect nothing (area 0).
    """
    return _intersect(*_pairwise_coords(box_a, box_b))


def jaccard(box_a: Array, box_b: Array) -> Array:
    """Pairwise IoU of point-form boxes: ``[..., A, 4] x [..., B, 4] -> [..., A, B]``."""
    a, b = _pairwise_coords(box_a, box_b)
    inter = _intersect(a, b)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter)


def encode(matched: Array, priors: Array, variances: Sequence[float]) -> Array:
    """Regression targets ``[..., 4]`` of point-form boxes ``matched`` relative to ``priors``.

    Centre offsets are divided by ``variances[0] * prior size``; the size ratio is ``log``-ed and
    divided by ``variances[1]``. Inverse of :func:`decode`.
    """
    matched, priors = jnp.asarray(matched), jnp.asarray(priors)
    g_cxcy = (matched[..., :2] + matched[..., 2:]) / 2 - priors[..., :2]
    g_cxcy = g_cxcy / (variances[0] * priors[..., 2:])
    g_wh = (matched[..., 2:] - matched[..., :2]) / priors[..., 2:]
    g_wh = jnp.log(g_wh) / variances[1]
    return jnp.concatenate([g_cxcy, g_wh], axis=-1)


def decode(loc: Array, priors: Array, variances: Sequence[float]) -> Array:
    """Point-form boxes ``[..., 4]`` from regression outputs ``loc`` and centre-form ``priors``."""
    loc, priors = jnp.asarray(loc), jnp.asarray(priors)
    # every column computed as (x, y, x, y) and the last two finished by a select: the same
    # arithmetic as concatenating x1y1 and x2y2, without a concatenate in the fused loop (faster
    # on XLA's CPU backend)
    xy, wh_cols = np.array([0, 1, 0, 1]), np.array([2, 3, 2, 3])
    cxcy = priors[..., xy] + loc[..., xy] * variances[0] * priors[..., wh_cols]
    wh = priors[..., wh_cols] * jnp.exp(loc[..., wh_cols] * variances[1])
    x1y1 = cxcy - wh / 2
    return jnp.where(jnp.arange(4) < 2, x1y1, wh + x1y1)


def _landm_points(x: Array) -> Array:
    """``[..., 10]`` -> ``[..., 5, 2]`` (five (x, y) points)."""
    if x.shape[-1] != 10:
        raise ValueError(f"landmarks: expected last axis of size 10, got shape {x.shape}")
    return x.reshape(*x.shape[:-1], 5, 2)


def encode_landm(matched: Array, priors: Array, variances: Sequence[float]) -> Array:
    """Regression targets ``[..., 10]`` of five landmark points ``matched`` w.r.t. ``priors``."""
    pts = _landm_points(jnp.asarray(matched))
    priors = jnp.asarray(priors)[..., None, :]
    g = (pts - priors[..., :2]) / (variances[0] * priors[..., 2:])
    return g.reshape(*g.shape[:-2], 10)


def decode_landm(pre: Array, priors: Array, variances: Sequence[float]) -> Array:
    """Five landmark points ``[..., 10]`` (x, y interleaved) from regression outputs ``pre``."""
    pts = _landm_points(jnp.asarray(pre))
    priors = jnp.asarray(priors)[..., None, :]
    out = priors[..., :2] + pts * variances[0] * priors[..., 2:]
    return out.reshape(*out.shape[:-2], 10)
