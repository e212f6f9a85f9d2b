"""Numerical parity with the original PyTorch RetinaFace (golden outputs and the ONNX export)."""

from __future__ import annotations

from collections import OrderedDict

import cv2
import jax
import numpy as np
import pytest
from seeded_weights import seeded_state_dict
from torch_files import tensor, write_legacy, write_zip

from retinaface_jax import load_model
from retinaface_jax.backends.planned_forward import planned_forward

MEAN = np.array([104.0, 117.0, 123.0], np.float32)


FORWARDS = {"reference": lambda m, x: m(x), "planned": planned_forward}


def run(model, x: np.ndarray, forward: str = "reference"):
    loc, conf, landms = jax.jit(FORWARDS[forward])(model, x)
    return np.asarray(loc), np.asarray(jax.nn.softmax(conf, -1)), np.asarray(landms)


@pytest.fixture(params=list(FORWARDS))
def conv_impl(request):
    """The reference model and the XLA path's planned forward must give the original's numbers
    (the formulations inside each are compared with ``lax.conv`` in ``test_conv_ops``)."""
    return request.param


@pytest.mark.parametrize(
    "case, writer",
    [("seeded_mobilenet0.25_seed1", write_legacy), ("seeded_Resnet50_seed0", write_zip)],
)
def test_seeded_weights_match_original(golden, tmp_path, conv_impl, case, writer):
    g = golden(case)
    sd = seeded_state_dict(g)
    path = writer(tmp_path / "seeded.pth", OrderedDict((k, tensor(v)) for k, v in sd.items()))
    model = load_model(path)
    loc, conf, landms = run(model, g["input_nhwc"], conv_impl)
    np.testing.assert_allclose(loc, g["loc"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(landms, g["landms"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(conf, g["conf_softmax"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def official(shared):
    return load_model(shared / "data/weights/mobilenet0.25_Final.pth")


def test_official_weights_match_original(golden, official):
    g = golden("reference_detect_curve_test")
    x = (g["image_bgr"].astype(np.float32) - MEAN)[None]
    loc, conf, landms = run(official, x)
    np.testing.assert_allclose(loc, g["loc"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(landms, g["landms"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(conf, g["conf_softmax"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def onnx_session(shared):
    ort = pytest.importorskip("onnxruntime")
    path = shared / "anchors/retinaface_mobilenet0.25_reference.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("hw", [(33, 47), (97, 130), (481, 643), (250, 375)])
def test_official_weights_match_onnx_export(shared, official, onnx_session, hw):
    img = cv2.imread(str(shared / "data/images/kinghoowei_street.jpg"))
    a = cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)
    b = cv2.resize(img[::-1, ::-1], (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
    x = np.stack([a, b]).astype(np.float32) - MEAN
    ref = onnx_session.run(None, {"input": np.ascontiguousarray(x.transpose(0, 3, 1, 2))})
    ref = dict(zip([o.name for o in onnx_session.get_outputs()], ref))
    loc, conf, landms = run(official, x)
    np.testing.assert_allclose(loc, ref["loc"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(landms, ref["landms"], atol=2e-4, rtol=0)
    np.testing.assert_allclose(conf, ref["conf"], atol=1e-5, rtol=0)
