"""Image input normalisation and the resize rules of the original scripts.

``load_image`` turns a path or an array into a contiguous ``[H, W, 3]`` BGR image (uint8, or
float32 for float input), converting grayscale, BGRA/RGBA and 16-bit images, and rejects anything
else with an error that names the input. ``resize_factor`` implements the original's scale rules;
``to_network_input`` resizes like the original (float32 ``cv2.resize``) and subtracts the mean
(``subtract_mean``, from ``retinaface_jax.mean_subtraction``, which the detector, the model
and the train step use inside their programs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from retinaface_jax.mean_subtraction import subtract_mean

ImageInput = str | os.PathLike | np.ndarray


class ImageError(ValueError):
    """An input that is not a usable image (unreadable file, wrong shape or dtype)."""


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file with OpenCV (any depth and channel count kept), or raise ImageError."""
    p = Path(path)
    if not p.is_file():
        raise ImageError(f"{p}: no such image file")
    data = np.fromfile(p, dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageError(f"{p}: not a readable image (OpenCV could not decode it)")
    return img


def load_image(image: ImageInput, *, rgb: bool = False, name: str | None = None) -> np.ndarray:
    """A path or array -> contiguous ``[H, W, 3]`` BGR array (uint8 or float32).

    Arrays are BGR by default (OpenCV convention); ``rgb=True`` says the array is RGB(A).
    Accepted: ``[H, W]`` / ``[H, W, 1]`` grayscale, ``[H, W, 3]``, ``[H, W, 4]`` (alpha dropped),
    dtypes uint8, uint16 (scaled to 0..255 like OpenCV's 16->8 bit conversion), other integer
    types in 0..255 and floats (taken as 0..255 values). Files are always decoded as BGR.
    """
    if isinstance(image, str | os.PathLike):
        label = name or str(image)
        arr = read_image_file(image)
        rgb = False
    else:
        label = name or "image array"
        arr = image
    if not isinstance(arr, np.ndarray):
        raise ImageError(f"{label}: expected a path or a numpy array, got {type(arr).__name__}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ImageError(f"{label}: expected a numeric image array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ImageError(f"{label}: empty image (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(
            f"{label}: expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
            f"got shape {arr.shape}"
        )
    arr = _to_8bit_range(arr, label)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if rgb:
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def _to_8bit_range(arr: np.ndarray, label: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        # OpenCV's convertTo(CV_8U, 1/257): round(v / 257), exact 0..65535 -> 0..255.
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"{label}: image contains NaN or infinite values")
        return arr.astype(np.float32, copy=False)
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi > 255:
        raise ImageError(
            f"{label}: integer image of dtype {arr.dtype} must hold values in 0..255 "
            f"(got {lo}..{hi}); use uint16 for 16-bit images"
        )
    return arr.astype(np.uint8)


def resize_factor(
    height: int, width: int, target_size: int | None = None, max_size: int | None = None
) -> float:
    """The scale the original scripts apply before the network.

    - neither given: 1.0 (original scale, the original detect.py ``--origin_size`` behaviour)
    - ``target_size`` and ``max_size``: the original test_widerface.py rule: scale the short side to
      ``target_size``, unless that makes the rounded long side exceed ``max_size``, in which case
      scale the long side to ``max_size`` (evaluation protocol: 1600 / 2150)
    - ``target_size`` alone: scale the short side to ``target_size``
    - ``max_size`` alone: a fixed long side, scale the long side to exactly ``max_size``
    """
    short, long = min(height, width), max(height, width)
    for field, v in (("target_size", target_size), ("max_size", max_size)):
        if v is not None and (not isinstance(v, int | np.integer) or v <= 0):
            raise ValueError(f"{field}: expected a positive integer or None, got {v!r}")
    if target_size is None and max_size is None:
        return 1.0
    if target_size is None:
        return float(max_size) / float(long)
    resize = float(target_size) / float(short)
    if max_size is not None and np.round(resize * long) > max_size:
        resize = float(max_size) / float(long)
    return resize


def resize_image(image: np.ndarray, resize: float) -> np.ndarray:
    """Resize like the original: the image becomes float32 before ``cv2.resize`` (bilinear,
    ``fx=fy=resize``). ``resize == 1`` returns the image unchanged (uint8 stays uint8)."""
    if resize == 1.0:
        return image
    img = np.asarray(image, dtype=np.float32)
    return cv2.resize(img, None, None, fx=resize, fy=resize, interpolation=cv2.INTER_LINEAR)


def to_network_input(image: np.ndarray, resize: float, rgb_mean: Any) -> np.ndarray:
    """BGR image -> float32 ``[h, w, 3]`` network input (resized like the original, mean removed).

    The detector does the mean subtraction inside its jitted program (same float32 arithmetic);
    this is the same step in numpy, for calling the raw model directly.
    """
    return subtract_mean(resize_image(image, resize), rgb_mean)
