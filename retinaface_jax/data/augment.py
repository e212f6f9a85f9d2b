"""Training augmentation with the original's ``data/data_augment.py`` semantics (numpy + OpenCV).

Order, as the original's ``preproc``: random square crop -> photometric distortion -> pad to square
with the mean (only when no crop was accepted) -> horizontal mirror -> resize to the training size
with a random OpenCV interpolation -> subtract the mean. Boxes and landmarks come out normalised to
[0, 1] of the final square image.

Differences from the original, all deliberate:
* randomness comes from an explicit ``np.random.Generator`` (deterministic per (seed, epoch, index))
  instead of the global ``random`` module;
* an image without faces skips the crop (it would fail all 250 tries) and is padded to a square:
  it trains as a pure negative (the original asserts);
* faces whose final normalised box has zero width or height are dropped (in the original they give
  ``log(0)`` in ``encode`` and a NaN loss);
* the per-pixel brightness/contrast/saturation/hue maps are applied as 256-entry lookup tables,
  which gives the same uint8 values as the original's float arithmetic, just faster;
* the output image is HWC (NHWC once batched), not CHW.
"""

from __future__ import annotations

import cv2
import numpy as np

# Crop side as a fraction of the image's short side (the original's PRE_SCALES).
CROP_SCALES = (0.3, 0.45, 0.6, 0.8, 1.0)
CROP_TRIES = 250
# The original's filter on kept faces, measured at training size with its "+1" pixel convention;
# its comment says 16 px but the code uses 0.0, which is what we keep.
MIN_FACE_AT_TRAIN_SIZE = 0.0
INTERPOLATIONS = (
    cv2.INTER_LINEAR,
    cv2.INTER_CUBIC,
    cv2.INTER_AREA,
    cv2.INTER_NEAREST,
    cv2.INTER_LANCZOS4,
)
# Landmark order after a horizontal flip: left/right eyes and mouth corners swap.
MIRROR_LANDMARK_ORDER = (1, 0, 2, 4, 3)
_LUT_INPUT = np.arange(256, dtype=np.float64)


def iof(boxes: np.ndarray, roi: np.ndarray) -> np.ndarray:
    """Intersection over each face's own area (floored at 1 px²), as the original's matrix_iof.

    ``boxes`` [N,4], ``roi`` [4] (x1,y1,x2,y2) -> [N].
    """
    lt = np.maximum(boxes[:, :2], roi[:2])
    rb = np.minimum(boxes[:, 2:], roi[2:])
    inter = np.prod(rb - lt, axis=1) * np.all(lt < rb, axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    return inter / np.maximum(area, 1)


def crop(
    image: np.ndarray,
    boxes: np.ndarray,
    landmarks: np.ndarray,
    labels: np.ndarray,
    image_size: int,
    rng: np.random.Generator,
    *,
    min_face: float = MIN_FACE_AT_TRAIN_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Random square crop; returns (image, boxes, landmarks, labels, crop_failed).

    Each try picks a side ``int(scale * short_side)`` with scale from ``CROP_SCALES`` and a random
    position; it is accepted when at least one face lies fully inside (iof >= 1) and some face
    centre lies strictly inside. Kept faces are those with the centre inside; their boxes are
    clipped to the crop, landmarks shifted and clipped, and faces smaller than ``min_face`` pixels
    at training size dropped. After ``CROP_TRIES`` failures the input is returned unchanged with
    ``crop_failed=True`` (the caller then pads to a square).
    """
    height, width = image.shape[:2]
    if boxes.shape[0] == 0:
        return image, boxes, landmarks, labels, True
    short_side = min(width, height)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for _ in range(CROP_TRIES):
        side = int(CROP_SCALES[rng.integers(len(CROP_SCALES))] * short_side)
        left = 0 if width == side else int(rng.integers(width - side))
        top = 0 if height == side else int(rng.integers(height - side))
        roi = np.array((left, top, left + side, top + side))
        if not np.any(iof(boxes, roi) >= 1):
            continue
        inside = np.all((roi[:2] < centres) & (centres < roi[2:]), axis=1)
        if not inside.any():
            continue
        b = boxes[inside].copy()
        b[:, :2] = np.maximum(b[:, :2], roi[:2]) - roi[:2]
        b[:, 2:] = np.minimum(b[:, 2:], roi[2:]) - roi[:2]
        lm = landmarks[inside].reshape(-1, 5, 2) - roi[:2]
        lm = np.minimum(np.maximum(lm, 0), roi[2:] - roi[:2]).reshape(-1, 10)
        lab = labels[inside]
        # the original's size filter, "+1" pixel convention, at training scale
        face_w = (b[:, 2] - b[:, 0] + 1) / side * image_size
        face_h = (b[:, 3] - b[:, 1] + 1) / side * image_size
        big = np.minimum(face_w, face_h) > min_face
        if not big.any():
            continue
        patch = image[top : top + side, left : left + side]
        return patch, b[big], lm[big], lab[big], False
    return image, boxes, landmarks, labels, True


def _lut(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """uint8 table of clip(v * alpha + beta, 0, 255) truncated, like the original's _convert."""
    return np.clip(_LUT_INPUT * alpha + beta, 0, 255).astype(np.uint8)


def _apply_channel(image: np.ndarray, channel: int, table: np.ndarray) -> None:
    image[:, :, channel] = cv2.LUT(np.ascontiguousarray(image[:, :, channel]), table)


def distort(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric distortion of a BGR uint8 image (returns a new array).

    One of the original's two orders, each step applied with probability 1/2:
    brightness (+U(-32,32)), contrast (xU(0.5,1.5)), then in HSV saturation (xU(0.5,1.5)) and hue
    (+randint[-18,18] mod 180); or brightness, HSV saturation/hue, then contrast. The HSV round
    trip always happens, as in the original.
    """
    contrast_first = bool(rng.integers(2))
    if rng.integers(2):
        image = cv2.LUT(image, _lut(beta=rng.uniform(-32, 32)))
    else:
        image = image.copy()
    if contrast_first and rng.integers(2):
        image = cv2.LUT(image, _lut(alpha=rng.uniform(0.5, 1.5)))
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    if rng.integers(2):
        _apply_channel(hsv, 1, _lut(alpha=rng.uniform(0.5, 1.5)))
    if rng.integers(2):
        shift = int(rng.integers(-18, 19))
        _apply_channel(hsv, 0, ((np.arange(256) + shift) % 180).astype(np.uint8))
    image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if not contrast_first and rng.integers(2):
        image = cv2.LUT(image, _lut(alpha=rng.uniform(0.5, 1.5)))
    return image


def pad_to_square(image: np.ndarray, fill: tuple[float, float, float]) -> np.ndarray:
    """Put the image at the top-left of a square of its long side filled with ``fill``."""
    height, width = image.shape[:2]
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=image.dtype)
    out[:, :] = fill
    out[:height, :width] = image
    return out


def mirror(
    image: np.ndarray, boxes: np.ndarray, landmarks: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """With probability 1/2 flip horizontally: x -> width - x, landmarks 0<->1 and 3<->4."""
    if not rng.integers(2):
        return image, boxes, landmarks
    width = image.shape[1]
    image = cv2.flip(image, 1)  # contiguous copy: cv2.resize is much slower on strided views
    boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    lm = landmarks.reshape(-1, 5, 2)[:, MIRROR_LANDMARK_ORDER].copy()
    lm[:, :, 0] = width - lm[:, :, 0]
    return image, boxes, lm.reshape(-1, 10)


def resize(image: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Resize to ``image_size``² with one of five OpenCV interpolations, uint8 to uint8.

    The original then subtracts the mean in float32 (``_resize_subtract_mean``); here the train
    step does that subtraction (``train.step``): the same arithmetic, and a quarter of
    the bytes through the workers' shared memory and onto the devices.
    """
    method = INTERPOLATIONS[rng.integers(len(INTERPOLATIONS))]
    return cv2.resize(image, (image_size, image_size), interpolation=method)


def augment(
    image: np.ndarray,
    boxes: np.ndarray,
    landmarks: np.ndarray,
    labels: np.ndarray,
    *,
    image_size: int,
    rgb_mean: tuple[float, float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The original's ``preproc`` on one BGR uint8 image with pixel boxes/landmarks.

    Returns ``image`` uint8 [S,S,3] BGR (the mean is subtracted in the train step; ``rgb_mean``
    fills the padding, as in the original) and ``targets`` float32 [K,15]
    (x1,y1,x2,y2, ten landmark coordinates, label), normalised to [0, 1]. Landmarks of faces with
    label -1 are set to 0 (the loss never reads them). K may be 0.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    landmarks = np.asarray(landmarks, np.float64).reshape(-1, 10)
    labels = np.asarray(labels, np.float64).reshape(-1)
    image, boxes, landmarks, labels, crop_failed = crop(
        image, boxes, landmarks, labels, image_size, rng
    )
    image = distort(image, rng)
    if crop_failed:
        image = pad_to_square(image, rgb_mean)
    image, boxes, landmarks = mirror(image, boxes, landmarks, rng)
    height, width = image.shape[:2]
    image = resize(image, image_size, rng)
    scale = np.array([width, height], np.float64)
    boxes = (boxes.reshape(-1, 2, 2) / scale).reshape(-1, 4)
    landmarks = (landmarks.reshape(-1, 5, 2) / scale).reshape(-1, 10)
    landmarks[labels < 0] = 0.0
    targets = np.concatenate([boxes, landmarks, labels[:, None]], axis=1).astype(np.float32)
    keep = (targets[:, 2] > targets[:, 0]) & (targets[:, 3] > targets[:, 1])
    return image, targets[keep]
