"""Every kind of input the detector accepts gives the original's detections on every path.

The input kinds (uint8 and float32, original scale and resized by each of the original's scale
rules, odd sizes, single images and mixed uint8/float batches) are crossed with every kernel
choice the detector offers. Each result is compared with the original pipeline run on the ONNX
export of the original model (``anchors/``) by an independent numpy re-implementation of its
post-processing, and the paths with each other. Until 2026-12 the parity tests compared the paths
on uint8 at original scale only, and the native path skipped the mean subtraction for every
float input: a matrix over kinds x paths, built from one list of each, closes that class of gap.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from test_detect_helpers import reference_postprocess

from retinaface_jax.backends.native.build import KERNEL_CHOICES
from retinaface_jax.config import get_config
from retinaface_jax.inference.detector import Detector
from retinaface_jax.inference.preprocess import resize_factor
from retinaface_jax.priors import prior_box

PATHS = [k for k in KERNEL_CHOICES if k != "auto"]  # auto is one of these (test_choose_kernels)
SCALES = {  # (target_size, max_size): the original's scale rules
    "original": (None, None),
    "short320": (320, None),
    "short1024": (1024, None),
    "wider1600-2150": (1600, 2150),
    "long900": (None, 900),
}
BOX_PX, SCORE = 0.05, 1e-4  # paths against each other (the bound)
# against the ONNX export: the model's float32 error (~5e-4 in loc) scaled to input pixels by the
# prior size over the resize factor
ORACLE_BOX_PX, ORACLE_SCORE = 0.1, 1e-4
CFG = get_config("mobilenet0.25")


@pytest.fixture(scope="module")
def model(shared):
    from retinaface_jax import load_model

    return load_model(shared / "data/weights/mobilenet0.25_Final.pth")


@pytest.fixture(scope="module")
def detectors(model):
    """``(scale, path) -> Detector``, built once each (batch 2: mixed batches really mix)."""
    cache: dict[tuple[str, str], Detector] = {}

    def get(scale: str, path: str) -> Detector:
        if (scale, path) not in cache:
            target, longest = SCALES[scale]
            cache[scale, path] = Detector(
                model,
                target_size=target,
                max_size=longest,
                batch_size=2,
                compilation_cache=False,
                kernels=path,
            )
            assert cache[scale, path].kernels == path
        return cache[scale, path]

    return get


@pytest.fixture(scope="module")
def onnx_session(shared):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    path = shared / "anchors" / "retinaface_mobilenet0.25_reference.onnx"
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def images(shared) -> dict[str, np.ndarray]:
    """Named inputs: uint8 files, their float32 copies, odd crops and a non-integral float."""
    full = cv2.imread(str(shared / "data/images/biubug6_curve_test.jpg"))
    assert full is not None
    crop = full[40:341, 100:555]  # 301 x 455: odd, padded into a bucket
    blurred = cv2.GaussianBlur(crop.astype(np.float32), (3, 3), 0.7)  # fractional values
    return {
        "uint8 624x1024": full,
        "float32 624x1024": full.astype(np.float32),
        "uint8 301x455": np.ascontiguousarray(crop),
        "float32 301x455": crop.astype(np.float32),
        "float32 blurred 301x455": blurred,
    }


# -- the original pipeline on its ONNX export, in numpy ----------------------------------------


def original_detect(session, image: np.ndarray, scale: str, conf_threshold: float) -> np.ndarray:
    """``[K, 15]`` rows (box, score, landmarks) as the original detect.py computes them: its
    resize and mean subtraction in numpy, its network (the ONNX export), its post-processing
    (``reference_postprocess``)."""
    target, longest = SCALES[scale]
    resize = resize_factor(image.shape[0], image.shape[1], target, longest)
    img = np.float32(image)
    if resize != 1:
        img = cv2.resize(img, None, None, fx=resize, fy=resize, interpolation=cv2.INTER_LINEAR)
    h, w = img.shape[:2]
    x = (img - np.float32(CFG.rgb_mean)).transpose(2, 0, 1)[None]
    loc, conf, landms = (o[0] for o in session.run(None, {"input": x}))
    return reference_postprocess(
        loc, conf, landms, prior_box(CFG, (h, w)), CFG, resize, h, w, conf=conf_threshold
    )


# -- comparisons -------------------------------------------------------------------------------


def rows(faces) -> np.ndarray:
    return np.stack([f.to_row() for f in faces]) if faces else np.zeros((0, 15), np.float32)


def assert_same(got: np.ndarray, ref: np.ndarray, what: str, box_px: float, score: float):
    assert len(ref) > 0, f"{what}: the reference found no faces"
    assert got.shape == ref.shape, f"{what}: {len(got)} faces, expected {len(ref)}"
    np.testing.assert_allclose(got[:, 4], ref[:, 4], rtol=0, atol=score, err_msg=f"{what} scores")
    np.testing.assert_allclose(got[:, :4], ref[:, :4], rtol=0, atol=box_px, err_msg=f"{what} boxes")
    np.testing.assert_allclose(
        got[:, 5:], ref[:, 5:], rtol=0, atol=box_px, err_msg=f"{what} landmarks"
    )


@pytest.mark.parametrize("scale", list(SCALES))
def test_every_input_kind_on_every_path_gives_the_original_detections(
    detectors, images, onnx_session, scale
):
    """detect_batch over all kinds (same-bucket uint8 + float32 inputs share a padded batch),
    detect on each alone: equal to the original pipeline, to each other and across paths."""
    names = list(images)
    results = {}
    for path in PATHS:
        det = detectors(scale, path)
        batched = det.detect_batch([images[n] for n in names])
        for name, faces in zip(names, batched, strict=True):
            results[path, name] = rows(faces)
            single = rows(det.detect(images[name]))
            assert_same(
                single, results[path, name], f"{path} {scale} {name}: detect vs batch", 1e-3, 1e-6
            )
    for name in names:
        ref = original_detect(onnx_session, images[name], scale, CFG.conf_threshold)
        for path in PATHS:
            assert_same(
                results[path, name],
                ref,
                f"{path} {scale} {name} vs original",
                ORACLE_BOX_PX,
                ORACLE_SCORE,
            )
        for path in PATHS[1:]:
            assert_same(
                results[path, name],
                results[PATHS[0], name],
                f"{path} vs {PATHS[0]} {scale} {name}",
                BOX_PX,
                SCORE,
            )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("size", [(32, 32), (33, 47)])
def test_constant_image_scores_do_not_depend_on_dtype(detectors, path, size):
    """The issue's smallest case: an image of 128s, every candidate kept (threshold 0): the uint8
    and float32 inputs give the same scores on every path."""
    det = detectors("original", path)
    u8 = np.full((*size, 3), 128, np.uint8)
    got = {
        dtype: rows(det.detect(u8.astype(dtype), conf_threshold=0.0, keep_top_k=None))
        for dtype in (np.uint8, np.float32)
    }
    assert len(got[np.uint8]) > 0
    assert_same(got[np.float32], got[np.uint8], f"{path} {size} float32 vs uint8", 1e-4, 1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_min_face_drops_exactly_the_smaller_faces(detectors, images, path):
    det = detectors("original", path)
    image = images["uint8 624x1024"]
    every = rows(det.detect(image, keep_top_k=None))
    size = np.minimum(every[:, 2] - every[:, 0], every[:, 3] - every[:, 1])
    assert (size < 30).any() and (size >= 30).any()  # the cut really splits this image's faces
    kept = rows(det.detect(image, keep_top_k=None, min_face=30))
    np.testing.assert_array_equal(kept, every[size >= 30])
    (batched,) = det.detect_batch([image], keep_top_k=None, min_face=30)
    np.testing.assert_array_equal(rows(batched), kept)
    for bad in (-1, float("nan"), float("inf"), "big"):
        with pytest.raises(ValueError, match="min_face: expected a number of pixels >= 0"):
            det.detect(image, min_face=bad)


def test_cli_min_face(shared, tmp_path, monkeypatch):
    import json

    from retinaface_jax.inference.cli import main

    monkeypatch.setenv("RETINAFACE_WEIGHTS", str(shared / "data/weights/mobilenet0.25_Final.pth"))
    src = shared / "data/images/biubug6_curve_test.jpg"
    counts = {}
    for flag in ([], ["--min-face", "30"]):
        out = tmp_path / ("min" if flag else "all")
        argv = [str(src), "--output", str(out), "--json", str(out / "f.jsonl"), "--no-draw"]
        assert main([*argv, "--quiet", *flag]) == 0
        (record,) = [json.loads(line) for line in (out / "f.jsonl").read_text().splitlines()]
        sides = [min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) for f in record["faces"]]
        counts[bool(flag)] = (len(sides), sum(s >= 30 for s in sides))
    assert counts[True][0] == counts[True][1] == counts[False][1] < counts[False][0]
    with pytest.raises(SystemExit) as bad:
        main([str(src), "--min-face", "-3", "--output", str(tmp_path / "x")])
    assert bad.value.code == 2
