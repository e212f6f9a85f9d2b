"""``python detect.py`` gives the same detections on every path for every kind of input file:
8-bit files (uint8), 32-bit float TIFFs (float32), odd sizes, at original scale and resized."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from retinaface_jax.inference.cli import main

PATHS = ("native", "xla")


@pytest.fixture(scope="module")
def inputs(shared, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-inputs")
    img = cv2.imread(str(shared / "data/images/biubug6_curve_test.jpg"))
    assert img is not None
    crop = np.ascontiguousarray(img[40:341, 100:555])  # 301 x 455
    files = {
        "full.jpg": img,
        "crop.png": crop,
        "float.tiff": crop.astype(np.float32) + np.float32(0.25),  # float pixels
    }
    for name, array in files.items():
        assert cv2.imwrite(str(root / name), array), name
    assert cv2.imread(str(root / "float.tiff"), cv2.IMREAD_UNCHANGED).dtype == np.float32
    return root


def _run(inputs, tmp_path, kernels: str, scale: list[str]) -> dict[str, list[dict]]:
    out = tmp_path / kernels
    argv = [str(inputs), "--output", str(out), "--json", str(out / "faces.jsonl"), "--no-draw"]
    argv += ["--kernels", kernels, "--quiet", *scale]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "faces.jsonl").read_text().splitlines()]
    return {r["image"].rsplit("/", 1)[-1]: r["faces"] for r in records}


@pytest.mark.parametrize(
    "scale", [[], ["--target-size", "480"], ["--max-size", "700"]], ids=["original", "t480", "m700"]
)
def test_cli_paths_agree_on_every_input_kind(shared, inputs, tmp_path, monkeypatch, scale):
    monkeypatch.setenv("RETINAFACE_WEIGHTS", str(shared / "data/weights/mobilenet0.25_Final.pth"))
    results = {k: _run(inputs, tmp_path, k, scale) for k in PATHS}
    assert sorted(results["xla"]) == ["crop.png", "float.tiff", "full.jpg"]
    for name, ref in results["xla"].items():
        got = results["native"][name]
        assert len(ref) > 0 and len(got) == len(ref), f"{name}: {len(got)} vs {len(ref)} faces"
        for key, tol in (("box", 0.05), ("landmarks", 0.05), ("score", 1e-4)):
            a = np.array([f[key] for f in got])
            b = np.array([f[key] for f in ref])
            np.testing.assert_allclose(a, b, rtol=0, atol=tol, err_msg=f"{name} {key}")
