"""Alignment to the ArcFace template with a known synthetic similarity transform."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from retinaface_jax.inference.align import (
    ARCFACE_TEMPLATE_112,
    align_faces,
    alignment_matrix,
    template,
    umeyama_similarity,
)
from retinaface_jax.inference.face import Face


def _similarity(scale, angle, tx, ty):
    c, s = np.cos(angle) * scale, np.sin(angle) * scale
    return np.array([[c, -s, tx], [s, c, ty], [0, 0, 1.0]])


@pytest.mark.parametrize("params", [(1.0, 0.0, 0, 0), (2.5, 0.3, 40, -7), (0.7, -1.2, 100, 80)])
def test_umeyama_recovers_known_similarity(params):
    t = _similarity(*params)
    src = np.random.default_rng(1).uniform(0, 100, (5, 2))
    dst = src @ t[:2, :2].T + t[:2, 2]
    np.testing.assert_allclose(umeyama_similarity(src, dst), t, atol=1e-9)


def test_reflection_is_excluded():
    src = np.random.default_rng(2).uniform(0, 50, (5, 2))
    dst = src * [-1, 1]  # a mirror image: the best proper similarity still has det > 0
    m = umeyama_similarity(src, dst)
    assert np.linalg.det(m[:2, :2]) > 0


def test_align_faces_undoes_a_known_warp():
    # a canonical 112x112 "face": smooth pattern plus dots at the template points
    yy, xx = np.mgrid[0:112, 0:112]
    canon = np.stack([(xx * 2) % 256, (yy * 2) % 256, ((xx + yy) * 1) % 256], -1).astype(np.uint8)
    for x, y in ARCFACE_TEMPLATE_112:
        cv2.circle(canon, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    t = _similarity(2.0, 0.4, 150, 60)  # crop -> big image
    big = cv2.warpAffine(canon, t[:2], (500, 400), flags=cv2.INTER_LINEAR)
    lm = ARCFACE_TEMPLATE_112 @ t[:2, :2].T + t[:2, 2]
    np.testing.assert_allclose(alignment_matrix(lm), np.linalg.inv(t)[:2], atol=1e-9)
    face = Face(box=np.zeros(4, np.float32), score=0.9, landmarks=lm.astype(np.float32))
    crops = align_faces(big, [face, lm])
    assert crops.shape == (2, 112, 112, 3) and crops.dtype == np.uint8
    inner = (slice(8, 104), slice(8, 104))
    err = np.abs(crops[0][inner].astype(int) - canon[inner].astype(int))
    assert np.median(err) <= 2 and err.mean() < 6
    # landmarks land on the template (float32 rounding of the landmarks only)
    np.testing.assert_allclose(
        lm @ alignment_matrix(face.landmarks)[:, :2].T + alignment_matrix(face.landmarks)[:, 2],
        ARCFACE_TEMPLATE_112,
        atol=1e-3,
    )


def test_other_sizes_and_empty():
    np.testing.assert_allclose(template(224), ARCFACE_TEMPLATE_112 * 2)
    img = np.zeros((50, 60, 3), np.uint8)
    assert align_faces(img, [], size=112).shape == (0, 112, 112, 3)
    assert align_faces(img[:, :, 0], [template(112)], size=64).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="size"):
        align_faces(img, [], size=0)
