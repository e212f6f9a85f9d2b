"""box_utils: geometry and box/landmark coding, against hand-computed values and round trips."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from retinaface_jax.box_utils import (
    center_size,
    decode,
    decode_landm,
    encode,
    encode_landm,
    intersect,
    jaccard,
    point_form,
)

VAR = (0.1, 0.2)


def _random_priors(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    cxcy = rng.uniform(0.1, 0.9, shape + (2,))
    wh = rng.uniform(0.02, 0.5, shape + (2,))
    return np.concatenate([cxcy, wh], -1).astype(np.float32)


def test_point_form_center_size_known_values_and_round_trip():
    c = np.array([[0.5, 0.4, 0.2, 0.6]], np.float32)
    np.testing.assert_allclose(point_form(c), [[0.4, 0.1, 0.6, 0.7]], atol=1e-7)
    np.testing.assert_allclose(center_size(point_form(c)), c, atol=1e-7)
    batched = _random_priors(np.random.default_rng(0), (3, 5, 7))
    out = point_form(batched)
    assert out.shape == (3, 5, 7, 4)
    np.testing.assert_allclose(center_size(out), batched, atol=1e-6)


def test_intersect_and_jaccard_known_values():
    a = np.array([[0.0, 0.0, 2.0, 2.0], [10.0, 10.0, 11.0, 11.0]], np.float32)
    b = np.array([[1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]], np.float32)
    np.testing.assert_allclose(intersect(a, b), [[2.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    # overlap 2, union 4 + 4 - 2 = 6
    np.testing.assert_allclose(jaccard(a, b), [[1 / 3, 1.0, 0.0], [0.0, 0.0, 0.0]], rtol=1e-6)


def test_jaccard_batched_equals_per_item():
    rng = np.random.default_rng(1)
    a = point_form(_random_priors(rng, (2, 3, 4)))
    b = point_form(_random_priors(rng, (2, 3, 5)))
    got = np.asarray(jaccard(a, b))
    assert got.shape == (2, 3, 4, 5)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(got[i, j], jaccard(a[i, j], b[i, j]), rtol=1e-6)
    # broadcasting one set of boxes against a batch
    shared = np.asarray(jaccard(a, b[0, 0]))
    np.testing.assert_allclose(shared[1, 2], jaccard(a[1, 2], b[0, 0]), rtol=1e-6)
    assert ((got >= 0) & (got <= 1 + 1e-6)).all()


def test_encode_known_value():
    prior = np.array([[0.5, 0.5, 0.2, 0.2]], np.float32)
    # centre (0.52, 0.5), size (0.4, 0.2): offsets 0.02 / (0.1 * 0.2) = 1, log(2) / 0.2
    box = np.array([[0.32, 0.4, 0.72, 0.6]], np.float32)
    np.testing.assert_allclose(
        encode(box, prior, VAR), [[1.0, 0.0, math.log(2) / 0.2, 0.0]], atol=1e-5
    )
    np.testing.assert_allclose(decode(np.zeros((1, 4), np.float32), prior, VAR), point_form(prior))


def test_encode_decode_round_trip_batched():
    rng = np.random.default_rng(2)
    priors = _random_priors(rng, (50,))
    boxes = point_form(_random_priors(rng, (3, 50)))
    codes = encode(boxes, priors, VAR)
    assert codes.shape == (3, 50, 4)
    np.testing.assert_allclose(decode(codes, priors, VAR), boxes, atol=1e-5)
    loc = rng.normal(size=(3, 50, 4)).astype(np.float32)
    np.testing.assert_allclose(encode(decode(loc, priors, VAR), priors, VAR), loc, atol=1e-4)


def test_landm_known_value_and_round_trip():
    prior = np.array([[0.5, 0.5, 0.2, 0.4]], np.float32)
    pts = np.array([[0.5, 0.5, 0.52, 0.5, 0.5, 0.54, 0.48, 0.46, 0.7, 0.9]], np.float32)
    # (x - 0.5) / (0.1 * 0.2), (y - 0.5) / (0.1 * 0.4)
    expected = [[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, -1.0, -1.0, 10.0, 10.0]]
    np.testing.assert_allclose(encode_landm(pts, prior, VAR), expected, atol=1e-5)
    np.testing.assert_allclose(decode_landm(np.asarray(expected), prior, VAR), pts, atol=1e-6)

    rng = np.random.default_rng(3)
    priors = _random_priors(rng, (40,))
    lm = rng.uniform(0, 1, (2, 40, 10)).astype(np.float32)
    codes = encode_landm(lm, priors, VAR)
    assert codes.shape == (2, 40, 10)
    np.testing.assert_allclose(decode_landm(codes, priors, VAR), lm, atol=1e-5)


def test_landm_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="10"):
        encode_landm(np.zeros((3, 8), np.float32), np.ones((3, 4), np.float32), VAR)


def test_jit_gives_same_values():
    rng = np.random.default_rng(4)
    priors = _random_priors(rng, (30,))
    loc = rng.normal(size=(2, 30, 4)).astype(np.float32)
    f = jax.jit(lambda x, p: decode(x, p, VAR))
    np.testing.assert_allclose(f(loc, priors), decode(loc, priors, VAR), rtol=1e-6, atol=1e-7)
