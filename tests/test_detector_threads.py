"""A Detector is safe to share between threads, first calls on new sizes included.

Each thread's first call traces a new program (a new size bucket, padded, so the padded region is
masked); they start together behind a barrier and must give the sequential results.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from retinaface_jax.inference.detector import Detector

THREADS = 4
# odd sizes in four different buckets: every first call traces a masked program
SIZES = [(301, 455), (157, 203), (97, 131), (233, 389)]


@pytest.fixture(scope="module")
def model(shared):
    from retinaface_jax import load_model

    return load_model(shared / "data/weights/mobilenet0.25_Final.pth")


@pytest.fixture(scope="module")
def crops(shared) -> list[np.ndarray]:
    img = cv2.imread(str(shared / "data/images/biubug6_curve_test.jpg"))
    assert img is not None
    out = [np.ascontiguousarray(img[20 : 20 + h, 40 : 40 + w]) for h, w in SIZES]
    out[1] = out[1].astype(np.float32)  # float inputs too
    return out


def _rows(faces) -> np.ndarray:
    return np.stack([f.to_row() for f in faces]) if faces else np.zeros((0, 15), np.float32)


@pytest.mark.parametrize("kernels", ["native", "xla"])
@pytest.mark.parametrize("compilation_cache", [False, True], ids=["in-memory", "program-cache"])
def test_concurrent_first_calls_give_the_sequential_results(
    model, crops, kernels, compilation_cache, tmp_path, monkeypatch
):
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path))  # a fresh program cache
    sequential = Detector(model, kernels=kernels, compilation_cache=False)
    expected = [_rows(sequential.detect(c)) for c in crops]
    shared_detector = Detector(model, kernels=kernels, compilation_cache=compilation_cache)
    barrier = threading.Barrier(THREADS)
    results: list[np.ndarray | BaseException | None] = [None] * THREADS

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = _rows(shared_detector.detect(crops[i]))
        except BaseException as e:  # reported below, with the thread's index
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for i, (got, ref) in enumerate(zip(results, expected, strict=True)):
        assert not isinstance(got, BaseException), f"thread {i} ({SIZES[i]}): {got!r}"
        assert got is not None, f"thread {i} did not finish"
        assert len(ref) > 0 and got.shape == ref.shape, f"thread {i}: {got.shape} vs {ref.shape}"
        np.testing.assert_array_equal(got, ref, err_msg=f"thread {i} ({SIZES[i]})")
