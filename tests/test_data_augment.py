"""Augmentation: the original's crop/distort/pad/mirror/resize semantics, geometry and determinism."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from retinaface_jax.config import cfg_mnet
from retinaface_jax.data import augment as A
from retinaface_jax.data.labels import load_records

MEAN = cfg_mnet.rgb_mean


class ScriptedRng:
    """Stands in for np.random.Generator with scripted draws (ints and floats kept separately)."""

    def __init__(self, ints: list[int], floats: list[float]) -> None:
        self.ints, self.floats = list(ints), list(floats)

    def integers(self, low: int, high: int | None = None) -> int:
        value = self.ints.pop(0)
        lo, hi = (0, low) if high is None else (low, high)
        assert lo <= value < hi
        return value

    def uniform(self, low: float, high: float) -> float:
        value = self.floats.pop(0)
        assert low <= value <= high
        return value


def _convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> None:
    """The original's in-place float conversion (reference for the lookup tables)."""
    tmp = image.astype(float) * alpha + beta
    tmp[tmp < 0] = 0
    tmp[tmp > 255] = 255
    image[:] = tmp


def _reference_distort(image, contrast_first, beta, contrast, saturation, hue):
    image = image.copy()
    if beta is not None:
        _convert(image, beta=beta)
    if contrast_first and contrast is not None:
        _convert(image, alpha=contrast)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    if saturation is not None:
        _convert(image[:, :, 1], alpha=saturation)
    if hue is not None:
        image[:, :, 0] = (image[:, :, 0].astype(int) + hue) % 180
    image = cv2.cvtColor(image, cv2.COLOR_HSV2BGR)
    if not contrast_first and contrast is not None:
        _convert(image, alpha=contrast)
    return image


@pytest.mark.parametrize(
    "contrast_first,beta,contrast,saturation,hue",
    [
        (1, 23.7, 1.37, 0.61, -18),
        (0, -31.2, 0.52, 1.49, 18),
        (1, None, 0.83, None, 7),
        (0, 12.5, None, 1.2, None),
        (0, None, None, None, None),
    ],
)
def test_distort_equals_the_original_arithmetic(contrast_first, beta, contrast, saturation, hue):
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    on = [v is not None for v in (beta, contrast, saturation, hue)]
    if contrast_first:
        ints = [1, on[0], on[1], on[2], on[3]] + ([hue] if on[3] else [])
        floats = [v for v in (beta, contrast, saturation) if v is not None]
    else:
        ints = [0, on[0], on[2], on[3]] + ([hue] if on[3] else []) + [on[1]]
        floats = [v for v in (beta, saturation, contrast) if v is not None]
    rng = ScriptedRng([int(i) for i in ints], floats)
    got = A.distort(image, rng)
    assert not rng.ints and not rng.floats
    want = _reference_distort(image, contrast_first, beta, contrast, saturation, hue)
    np.testing.assert_array_equal(got, want)


def test_iof_is_fraction_of_face_inside() -> None:
    boxes = np.array([[10, 10, 20, 20], [15, 15, 35, 25], [50, 50, 60, 60], [12, 12, 12.5, 12.5]])
    got = A.iof(boxes, np.array([0, 0, 30, 30]))
    np.testing.assert_allclose(got, [1.0, 150 / 200, 0.0, 0.25])  # area floored at 1 px²


def test_crop_geometry() -> None:
    image = np.arange(300 * 400 * 3, dtype=np.uint32).reshape(300, 400, 3)
    rng0 = np.random.default_rng(1)
    boxes = rng0.uniform(0, 250, (30, 2))
    boxes = np.concatenate([boxes, boxes + rng0.uniform(5, 60, (30, 2))], 1)
    landmarks = np.repeat((boxes[:, :2] + boxes[:, 2:]) / 2, 5, axis=0).reshape(-1, 10)
    labels = np.where(np.arange(30) % 2, 1.0, -1.0)
    sides = set()
    for seed in range(40):
        patch, b, lm, lab, failed = A.crop(
            image, boxes, landmarks, labels, 640, np.random.default_rng(seed)
        )
        assert not failed
        side = patch.shape[0]
        assert patch.shape[1] == side
        sides.add(round(side / 300, 2))
        # the patch is a window of the input: find its offset from its first pixel
        top, left = divmod(int(patch[0, 0, 0]) // 3, 400)
        np.testing.assert_array_equal(patch, image[top : top + side, left : left + side])
        roi = np.array([left, top, left + side, top + side])
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = np.all((roi[:2] < centres) & (centres < roi[2:]), axis=1)
        assert np.any(A.iof(boxes, roi) >= 1)  # some face fully inside
        assert len(b) == inside.sum()  # kept: exactly the faces with centre inside
        np.testing.assert_allclose(
            b,
            np.clip(boxes[inside], roi[:2].repeat(1)[[0, 1, 0, 1]], roi[[2, 3, 2, 3]])
            - roi[[0, 1, 0, 1]],
        )
        np.testing.assert_allclose(lm, np.clip(landmarks[inside] - np.tile(roi[:2], 5), 0, side))
        np.testing.assert_array_equal(lab, labels[inside])
    assert sides <= {round(int(s * 300) / 300, 2) for s in A.CROP_SCALES}
    assert len(sides) >= 3


def test_crop_fails_without_a_containable_face() -> None:
    image = np.zeros((100, 50, 3), np.uint8)
    boxes = np.array([[0.0, 0.0, 50.0, 100.0]])  # taller than any square crop
    out = A.crop(image, boxes, np.zeros((1, 10)), np.ones(1), 640, np.random.default_rng(0))
    assert out[4] is True and out[0] is image
    empty = A.crop(image, np.zeros((0, 4)), np.zeros((0, 10)), np.zeros(0), 640, None)
    assert empty[4] is True


def test_pad_to_square_and_mirror() -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    sq = A.pad_to_square(image, MEAN)
    assert sq.shape == (30, 30, 3)
    np.testing.assert_array_equal(sq[:20], image)
    assert np.all(sq[20:] == np.array(MEAN, np.uint8))
    boxes = np.array([[2.0, 3.0, 10.0, 12.0]])
    lms = np.array([[3.0, 5, 8, 5, 6, 8, 4, 10, 9, 11]])
    flipped, fb, fl = A.mirror(image, boxes, lms, ScriptedRng([1], []))
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(fb, [[20, 3, 28, 12]])
    # eyes and mouth corners swap so "left" stays left of "right" in the flipped image
    np.testing.assert_array_equal(fl, [[30 - 8, 5, 30 - 3, 5, 30 - 6, 8, 30 - 9, 11, 30 - 4, 10]])
    same = A.mirror(image, boxes, lms, ScriptedRng([0], []))
    assert same[0] is image


def test_resize_uses_the_five_interpolations() -> None:
    image = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    for k, method in enumerate(A.INTERPOLATIONS):
        got = A.resize(image, 32, ScriptedRng([k], []))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, cv2.resize(image, (32, 32), interpolation=method))


def test_augment_boxes_follow_the_pixels() -> None:
    """A bright square on a dark background: after augmentation the target box covers it."""
    image = np.full((240, 320, 3), 40, np.uint8)
    image[60:140, 200:280] = 230
    boxes = np.array([[200.0, 60.0, 280.0, 140.0]])
    lms = np.array([[210.0, 80, 270, 80, 240, 100, 215, 125, 265, 125]])
    size = 96
    for seed in range(12):
        out, t = A.augment(
            image,
            boxes,
            lms,
            np.ones(1),
            image_size=size,
            rgb_mean=MEAN,
            rng=np.random.default_rng(seed),
        )
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        assert t.shape == (1, 15) and t[0, 14] == 1
        x1, y1, x2, y2 = np.round(t[0, :4] * size).astype(int)
        gray = out.sum(-1)
        inner = gray[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean()
        mask = np.ones_like(gray, bool)
        mask[max(y1 - 2, 0) : y2 + 2, max(x1 - 2, 0) : x2 + 2] = False
        assert inner > gray[mask].mean() + 50
        lm = t[0, 4:14].reshape(5, 2)
        assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # left/right order kept by the swap
        assert np.all((lm >= t[0, :2]) & (lm <= t[0, 2:4]))


def test_augment_empty_and_degenerate_faces() -> None:
    image = np.full((50, 70, 3), 100, np.uint8)
    rng = np.random.default_rng(0)
    out, t = A.augment(
        image,
        np.zeros((0, 4)),
        np.zeros((0, 10)),
        np.zeros(0),
        image_size=64,
        rgb_mean=MEAN,
        rng=rng,
    )
    assert out.shape == (64, 64, 3) and t.shape == (0, 15)
    # a zero-width face would give log(0) = NaN in encode; it is dropped, the other is kept
    boxes = np.array([[10.0, 10, 10, 30], [20, 10, 40, 30]])
    for seed in range(5):
        _, t = A.augment(
            image,
            boxes,
            np.zeros((2, 10)),
            -np.ones(2),
            image_size=64,
            rgb_mean=MEAN,
            rng=np.random.default_rng(seed),
        )
        assert len(t) == 1 and np.all(t[:, 2] > t[:, 0]) and np.all(t[:, 3] > t[:, 1])


def test_augment_real_images_deterministic_and_normalised(shared: Path) -> None:
    recs, _ = load_records(shared / "data" / "widerface" / "train" / "label.txt")
    for i, r in enumerate(recs[:6]):
        image = cv2.imread(r.path)
        args = (image, r.boxes, r.landmarks, r.labels)
        kw = dict(image_size=160, rgb_mean=MEAN)
        a, ta = A.augment(*args, **kw, rng=np.random.default_rng([0, 0, i]))
        b, tb = A.augment(*args, **kw, rng=np.random.default_rng([0, 0, i]))
        c, _ = A.augment(*args, **kw, rng=np.random.default_rng([0, 1, i]))
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ta, tb)
        assert not np.array_equal(a, c)
        assert len(ta) >= 1 and np.all(np.isfinite(ta))
        assert np.all((ta[:, :4] >= 0) & (ta[:, :4] <= 1))
        assert np.all((ta[:, 2] > ta[:, 0]) & (ta[:, 3] > ta[:, 1]))
        has = ta[:, 14] > 0
        assert np.all((ta[has, 4:14] >= 0) & (ta[has, 4:14] <= 1))
        assert np.all(ta[~has, 4:14] == 0)
