"""Anonymising detected faces: blur, pixelate or fill each face box (plus a margin).

The strength follows the face size, so a large face is hidden as well as a small one: the blur's
sigma and the pixelation's cell size are fractions of the face's longer box side. The defaults
are chosen so that the detector finds no face at the default visualisation threshold (0.6) in the
anonymised image (``tests/test_anonymize.py`` checks this on the shared images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from retinaface_jax.inference.face import Face

METHODS = ("blur", "pixelate", "solid")
# blur: Gaussian sigma = strength * BLUR_SIGMA * face size; pixelate: cell side = strength *
# PIXEL_CELL * face size. Chosen with DEFAULT_MARGIN on the shared images (tests/test_anonymize.py):
# with a quarter-face sigma, or 4+ blocks across the face, mobilenet0.25 still finds some
# anonymised faces (up to 0.73 / 0.99 at 8 blocks); with these it finds none above ~0.3.
DEFAULT_MARGIN = 0.5
BLUR_SIGMA = 0.5
PIXEL_CELL = 2 / 3
# a blur with a larger sigma runs on a copy downscaled to this sigma, then upscaled (the same
# smooth result, at a cost independent of the face size)
_MAX_WORKING_SIGMA = 4.0


def anonymize(
    image: np.ndarray,
    faces: Sequence[Face],
    method: str = "blur",
    *,
    margin: float = DEFAULT_MARGIN,
    strength: float = 1.0,
    color: Sequence[float] = (0, 0, 0),
    min_score: float = 0.0,
) -> np.ndarray:
    """A copy of ``image`` with every face of ``faces`` (score >= ``min_score``) covered.

    ``image``: BGR ``[H, W, 3]`` (or ``[H, W]`` / ``[H, W, C]``), any dtype OpenCV handles, e.g.
    uint8; never modified. ``faces``: :class:`Face` objects (anything with ``.box`` ``x1, y1, x2,
    y2`` in image pixels and ``.score``), e.g. ``Detector.detect``'s result. Each box grows by
    ``margin`` times its width / height on each side, is clipped to the image, and that rectangle
    is covered by ``method``:

    - ``"blur"``: Gaussian blur with sigma = ``strength`` x 1/2 of the face size (its box's longer
      side), computed on a crop padded by 3 sigma so the result does not depend on where the
      rectangle ends;
    - ``"pixelate"``: blocks of ``strength`` x 2/3 of the face size, each the mean of its pixels
      (3 x 3 blocks over a square box with the default margin);
    - ``"solid"``: filled with ``color`` (default black).

    Faces with empty or non-finite boxes (or outside the image) are ignored. The defaults
    (``margin`` 0.5, i.e. twice the box's size, and the strengths above) are the weakest of those
    tried with which the detector no longer finds the anonymised faces at its default
    visualisation threshold (0.6); finer blurs or blocks leave small faces detectable.
    """
    if method not in METHODS:
        raise ValueError(f"unknown anonymize method {method!r}; choose one of {', '.join(METHODS)}")
    if not (isinstance(margin, int | float) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if not (isinstance(strength, int | float) and math.isfinite(strength) and strength > 0):
        raise ValueError(f"strength must be a finite number > 0, got {strength!r}")
    image = np.asarray(image)
    if image.ndim not in (2, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image must be a non-empty [H, W] or [H, W, C] array, got {image.shape}")
    out = np.array(image, copy=True, order="C")
    for face in faces:
        if float(face.score) < min_score:
            continue
        rect = _region(face.box, margin, out.shape[:2])
        if rect is None:
            continue
        size = _face_size(face.box)
        if method == "blur":
            _blur(out, rect, strength * BLUR_SIGMA * size)
        elif method == "pixelate":
            _pixelate(out, rect, strength * PIXEL_CELL * size)
        else:
            _fill(out, rect, color)
    return out


def _face_size(box: Any) -> float:
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    return max(x2 - x1, y2 - y1, 1.0)


def _region(box: Any, margin: float, hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The box grown by ``margin`` on each side, in whole pixels clipped to the image (or None)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None
    mx, my = margin * (x2 - x1), margin * (y2 - y1)
    h, w = hw
    rx1, ry1 = max(0, math.floor(x1 - mx)), max(0, math.floor(y1 - my))
    rx2, ry2 = min(w, math.ceil(x2 + mx)), min(h, math.ceil(y2 + my))
    if rx2 <= rx1 or ry2 <= ry1:
        return None
    return rx1, ry1, rx2, ry2


def _blur(out: np.ndarray, rect: tuple[int, int, int, int], sigma: float) -> None:
    x1, y1, x2, y2 = rect
    h, w = out.shape[:2]
    pad = math.ceil(3 * sigma)
    px1, py1, px2, py2 = max(0, x1 - pad), max(0, y1 - pad), min(w, x2 + pad), min(h, y2 + pad)
    crop = out[py1:py2, px1:px2]
    ch, cw = crop.shape[:2]
    scale = min(1.0, _MAX_WORKING_SIGMA / sigma)
    small_w, small_h = max(1, round(cw * scale)), max(1, round(ch * scale))
    if (small_w, small_h) != (cw, ch):
        work = cv2.resize(crop, (small_w, small_h), interpolation=cv2.INTER_AREA)
    else:
        work = crop
    s = sigma * small_w / cw
    k = 2 * math.ceil(3 * s) + 1  # odd, +-3 sigma
    blurred = cv2.GaussianBlur(work, (k, k), s, borderType=cv2.BORDER_REFLECT_101)
    if blurred is not work and blurred.shape[:2] != (ch, cw):
        blurred = cv2.resize(blurred, (cw, ch), interpolation=cv2.INTER_LINEAR)
    blurred = blurred.reshape(crop.shape)
    out[y1:y2, x1:x2] = blurred[y1 - py1 : y2 - py1, x1 - px1 : x2 - px1]


def _pixelate(out: np.ndarray, rect: tuple[int, int, int, int], cell: float) -> None:
    x1, y1, x2, y2 = rect
    region = out[y1:y2, x1:x2]
    rh, rw = region.shape[:2]
    nx, ny = max(1, round(rw / cell)), max(1, round(rh / cell))
    small = cv2.resize(region, (nx, ny), interpolation=cv2.INTER_AREA)
    out[y1:y2, x1:x2] = cv2.resize(small, (rw, rh), interpolation=cv2.INTER_NEAREST).reshape(
        region.shape
    )


def _fill(out: np.ndarray, rect: tuple[int, int, int, int], color: Sequence[float]) -> None:
    x1, y1, x2, y2 = rect
    values = np.asarray(color, dtype=np.float64).reshape(-1)
    channels = 1 if out.ndim == 2 else out.shape[2]
    if values.size == 1:
        values = np.repeat(values, channels)
    elif values.size != channels:
        raise ValueError(f"color has {values.size} values for a {channels}-channel image")
    out[y1:y2, x1:x2] = values.astype(out.dtype) if out.ndim == 3 else values[0]
