"""End to end: our detector with the official weights at original scale over the 403 shared val
images gives the original's AP (golden/README.md) within 0.001. Slow: minutes on CPU."""

from __future__ import annotations

import re
import time
import warnings

import pytest

from retinaface_jax import Detector
from retinaface_jax.evaluate import run
from retinaface_jax.evaluate.widerface_ap import evaluate_widerface
from retinaface_jax.evaluate.widerface_gt import load_widerface_gt


@pytest.mark.slow
def test_detector_ap_equals_original_on_403_val_images(shared, tmp_path):
    text = (shared / "golden" / "README.md").read_text()
    m = re.search(r"easy ([0-9.]+), medium ([0-9.]+), hard ([0-9.]+)", text)
    expected = dict(zip(("easy", "medium", "hard"), map(float, m.groups()), strict=True))
    gt = load_widerface_gt(shared / "data" / "widerface" / "gt")
    detector = Detector.from_pretrained(shared / "data" / "weights" / "mobilenet0.25_Final.pth")
    images = run.widerface_jobs(shared / "data" / "widerface" / "val" / "images", gt, tmp_path)
    assert len(images) == 403
    start = time.perf_counter()
    written, failed = run.detect_widerface(
        detector,
        images,
        tmp_path,
        conf_threshold=detector.cfg.conf_threshold,
        nms_threshold=detector.cfg.nms_threshold,
        progress=False,
    )
    seconds = time.perf_counter() - start
    assert not failed and len(written) == 403
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 403 of 3226 images: expected
        result = evaluate_widerface(tmp_path, gt)
    print(f"detection over 403 images: {seconds:.1f} s; AP {result.ap}")
    assert result.num_images == 403
    for s in ("easy", "medium", "hard"):
        assert abs(result.ap[s] - expected[s]) <= 1e-3, (s, result.ap[s], expected[s])
