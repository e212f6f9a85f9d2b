"""Detections with the official weights equal the original detect.py output (golden files)."""

from __future__ import annotations

import numpy as np
import pytest

from retinaface_jax.inference.detector import Detector

CASES = ["reference_detect_curve_test", "reference_detect_wider_19_Couple_19_1014"]


@pytest.fixture(scope="module")
def official_model(shared):
    from retinaface_jax.weights.load import load_model

    return load_model(shared / "data" / "weights" / "mobilenet0.25_Final.pth")


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("exact_sizes", [False, True], ids=["bucketed", "exact"])
def test_detections_equal_original(official_model, golden, name, exact_sizes):
    ref_npz = golden(name)
    det = Detector(official_model, exact_sizes=exact_sizes, compilation_cache=False)
    image = ref_npz["image_bgr"]
    if not exact_sizes and name.endswith("curve_test"):
        assert det.bucket_of(*image.shape[:2]) != image.shape[:2]  # really padded
    faces = det.detect(image)  # the original's defaults: 0.02, 0.4, 5000, 750
    ref = ref_npz["dets_x1y1x2y2_score_landm10"]
    got = np.stack([f.to_row() for f in faces])
    assert got.shape == ref.shape
    np.testing.assert_allclose(got[:, 4], ref[:, 4], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[:, :4], ref[:, :4], rtol=0, atol=0.05)
    np.testing.assert_allclose(got[:, 5:], ref[:, 5:], rtol=0, atol=0.05)
    lm = np.stack([f.landmarks for f in faces])
    np.testing.assert_array_equal(lm.reshape(len(faces), 10), got[:, 5:])
