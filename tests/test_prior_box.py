"""prior_box: equal to the original's priors, in its order, vectorised and cached."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retinaface_jax.config import cfg_mnet, cfg_re50
from retinaface_jax.priors import prior_box


def _naive_priors(min_sizes, steps, h: int, w: int) -> np.ndarray:
    """Reference written as the definition reads: level, row, column, anchor size."""
    rows = []
    for sizes, step in zip(min_sizes, steps, strict=True):
        for i in range(math.ceil(h / step)):
            for j in range(math.ceil(w / step)):
                for s in sizes:
                    rows.append([(j + 0.5) * step / w, (i + 0.5) * step / h, s / w, s / h])
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("cfg", [cfg_mnet, cfg_re50], ids=["mobilenet0.25", "resnet50"])
def test_equals_golden_priors(golden, cfg):
    ref = golden("priors")
    assert ref, "golden priors.npz holds no arrays"
    for key, expected in ref.items():
        h, w = (int(v) for v in key.removeprefix("priors_").split("x"))
        got = prior_box(cfg, (h, w))
        assert got.dtype == np.float32
        assert got.shape == expected.shape, key
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (100, 37)])
def test_order_and_count_match_definition(size):
    got = prior_box(cfg_mnet, size)
    expected = _naive_priors(cfg_mnet.min_sizes, cfg_mnet.steps, *size)
    n = sum(
        math.ceil(size[0] / s) * math.ceil(size[1] / s) * len(m)
        for m, s in zip(cfg_mnet.min_sizes, cfg_mnet.steps, strict=True)
    )
    assert got.shape == (n, 4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)


def test_cached_and_read_only():
    a = prior_box(cfg_mnet, (96, 128))
    b = prior_box(cfg_mnet, (96, 128))
    assert a is b
    with pytest.raises(ValueError):
        a[0, 0] = 1.0
    # a different size or config gives a different array
    assert prior_box(cfg_mnet, (128, 96)).shape == a.shape
    assert not np.array_equal(prior_box(cfg_mnet, (128, 96)), a)
    other = prior_box(cfg_mnet.replace(min_sizes=[[8, 16], [64, 128], [256, 512]]), (96, 128))
    assert not np.array_equal(other, a)


def test_clip_option():
    size = (40, 56)  # the 256/512 anchors exceed the image
    raw = prior_box(cfg_mnet, size)
    assert raw.max() > 1.0
    clipped = prior_box(cfg_mnet.replace(clip=True), size)
    np.testing.assert_array_equal(clipped, np.clip(raw, 0.0, 1.0))


@pytest.mark.parametrize("bad", [(0, 640), (640,), (640.0, 480), (-1, 5), "640x480"])
def test_bad_size_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="image_size"):
        prior_box(cfg_mnet, bad)
