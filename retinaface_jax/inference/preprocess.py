"""Image input normalisation and the resize rules of the original scripts.

``load_image`` turns a path or an array into a contiguous ``[H, W, 3]`` BGR image (uint8, or
float32 for float input), converting grayscale, BGRA/RGBA and 16-bit images, and rejects anything
else with an error that names the input; images over a pixel cap (100 megapixels by default) are
refused, files from their header before decoding. ``resize_factor`` implements the original's
scale rules; ``to_network_input`` resizes like the original (float32 ``cv2.resize``) and subtracts the mean
(``subtract_mean``, from ``retinaface_jax.models.mean_subtraction``, which the detector, the model
and the train step use inside their programs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from retinaface_jax.image_header import image_file_size
from retinaface_jax.models.mean_subtraction import subtract_mean

ImageInput = str | os.PathLike | np.ndarray


class ImageError(ValueError):
    """An input that is not a usable image (unreadable file, wrong shape or dtype, too large)."""


# -- the pixel cap -------------------------------------------------------------------------------
MAX_PIXELS_ENV = "RETINAFACE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000
_max_pixels_override: ContextVar[int | None] = ContextVar("max_pixels", default=None)


def default_max_pixels() -> int:
    """The pixel cap when none is passed: :func:`max_pixels_limit`'s value, else
    ``$RETINAFACE_MAX_PIXELS``, else 100 megapixels; ``0`` means no cap."""
    override = _max_pixels_override.get()
    if override is not None:
        return override
    env = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not env:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(env)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${MAX_PIXELS_ENV}={env!r}: expected a pixel count >= 0 (0 = no cap)")
    return value


@contextmanager
def max_pixels_limit(max_pixels: int) -> Iterator[None]:
    """Within the block, ``load_image`` calls without ``max_pixels=`` use this cap (the CLI's
    ``--max-pixels`` reaches the detector's own ``load_image`` this way)."""
    token = _max_pixels_override.set(_check_cap(max_pixels))
    try:
        yield
    finally:
        _max_pixels_override.reset(token)


def _check_cap(max_pixels: int | None) -> int:
    if max_pixels is None:
        return default_max_pixels()
    if not isinstance(max_pixels, int | np.integer) or max_pixels < 0:
        raise ValueError(f"max_pixels: expected an integer >= 0 (0 = no cap), got {max_pixels!r}")
    return int(max_pixels)


def check_pixels(label: str, width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise ImageError naming ``label``, its size and the cap if ``width * height`` exceeds it."""
    cap = _check_cap(max_pixels)
    if cap and width * height > cap:
        raise ImageError(
            f"{label}: {width}x{height} image ({width * height:,} pixels) is larger than the "
            f"limit of {cap:,} pixels (raise it with max_pixels=, --max-pixels or "
            f"${MAX_PIXELS_ENV}; 0 = no limit)"
        )


def _cv_message(error: Exception) -> str:
    """The useful part of a multi-line ``cv2.error`` message."""
    text = " ".join(str(error).split())
    return text.split(" error: ", 1)[-1]


def read_image_file(path: str | os.PathLike, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode an image file with OpenCV (any depth and channel count kept), or raise ImageError.

    Images over the pixel cap (``max_pixels``, see :func:`default_max_pixels`) are refused from
    their header, before they are decoded: a small file can claim a huge size. For formats whose
    header we do not read, the cap is checked after decoding (OpenCV's own limit,
    ``OPENCV_IO_MAX_IMAGE_PIXELS``, 2**30 by default, bounds that).
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such image file")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file (a directory, pipe or device)")
    cap = _check_cap(max_pixels)
    try:
        size = image_file_size(p)
        if size is not None:
            check_pixels(str(p), *size, cap)
        data = np.fromfile(p, dtype=np.uint8)  # works for non-ASCII paths, unlike cv2.imread
    except OSError as e:
        raise ImageError(f"{p}: cannot read the file ({e.strerror or e})") from None
    except MemoryError:
        raise ImageError(f"{p}: out of memory reading the file") from None
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except cv2.error as e:
        if "CV_IO_MAX_IMAGE_PIXELS" in str(e):
            raise ImageError(
                f"{p}: image is larger than OpenCV's pixel limit (OPENCV_IO_MAX_IMAGE_PIXELS)"
            ) from None
        raise ImageError(f"{p}: OpenCV could not decode it ({_cv_message(e)})") from None
    except MemoryError:
        raise ImageError(f"{p}: out of memory decoding the image") from None
    if img is None:
        raise ImageError(f"{p}: not a readable image (OpenCV could not decode it)")
    check_pixels(str(p), img.shape[1], img.shape[0], cap)
    return img


def load_image(
    image: ImageInput, *, rgb: bool = False, name: str | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """A path or array -> contiguous ``[H, W, 3]`` BGR array (uint8 or float32).

    Arrays are BGR by default (OpenCV convention); ``rgb=True`` says the array is RGB(A).
    Accepted: ``[H, W]`` / ``[H, W, 1]`` grayscale, ``[H, W, 3]``, ``[H, W, 4]`` (alpha dropped),
    dtypes uint8, uint16 (scaled to 0..255 like OpenCV's 16->8 bit conversion), other integer
    types in 0..255 and floats (taken as 0..255 values). Files are always decoded as BGR.
    Images of more than ``max_pixels`` pixels are refused (default: ``$RETINAFACE_MAX_PIXELS``
    or 100 megapixels; 0 = no cap; files are checked from their header, before decoding).
    """
    if isinstance(image, str | os.PathLike):
        label = name or str(image)
        arr = read_image_file(image, max_pixels=max_pixels)
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
    check_pixels(label, arr.shape[1], arr.shape[0], max_pixels)
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
        # checked after the conversion: float64 values beyond float32's range become inf
        with np.errstate(over="ignore"):
            out = arr.astype(np.float32, copy=False)
        if not np.all(np.isfinite(out)):
            raise ImageError(
                f"{label}: image has NaN or infinite values (or values beyond float32's range)"
            )
        return out
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
