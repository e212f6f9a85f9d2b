"""ONNX export (issue 30): parity with the original's export (the anchor) and with our model,
graph structure, detections through the recipe, the CLI and int8."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from retinaface_jax import Detector, load_model  # noqa: E402
from retinaface_jax.export import __main__ as cli  # noqa: E402
from retinaface_jax.export.onnx_decode import (  # noqa: E402
    OnnxDetector,
    decode_onnx_outputs,
    onnx_input,
)
from retinaface_jax.export.onnx_export import build_onnx, export_onnx  # noqa: E402
from retinaface_jax.inference.preprocess import load_image  # noqa: E402
from retinaface_jax.models.layers import BatchNorm2d  # noqa: E402
from retinaface_jax.models.retinaface import RetinaFace  # noqa: E402

WEIGHTS = "data/weights/mobilenet0.25_Final.pth"
ANCHOR = "anchors/retinaface_mobilenet0.25_reference.onnx"
MEAN = np.array([104, 117, 123], np.float32)[:, None, None]


def _session(model) -> ort.InferenceSession:
    """A CPU session of a file or of serialised model bytes."""
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _input(rng, n: int, h: int, w: int) -> np.ndarray:
    return (rng.uniform(0, 255, (n, 3, h, w)).astype(np.float32) - MEAN).astype(np.float32)


@pytest.fixture(scope="module")
def mnet(shared: Path):
    return load_model(shared / WEIGHTS)


@pytest.fixture(scope="module")
def mnet_onnx(mnet, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "retinaface.onnx"
    export_onnx(mnet, path)
    return path


@pytest.fixture(scope="module")
def anchor(shared: Path) -> ort.InferenceSession:
    return _session(shared / ANCHOR)


@pytest.mark.parametrize("n,h,w", [(2, 301, 457), (3, 97, 131), (1, 480, 640), (2, 33, 65)])
def test_outputs_equal_the_anchor(mnet_onnx, anchor, n, h, w):
    """Odd sizes (FPN upsampling with the floor rule), batches > 1, one file: N, H, W dynamic."""
    x = _input(np.random.default_rng(n * h + w), n, h, w)
    ours = _session(mnet_onnx).run(None, {"input": x})
    ref = anchor.run(None, {"input": x})
    names = [o.name for o in _session(mnet_onnx).get_outputs()]
    assert names == [o.name for o in anchor.get_outputs()] == ["loc", "conf", "landms"]
    for name, a, b, tol in zip(names, ours, ref, (5e-4, 2e-5, 5e-4), strict=True):
        assert a.shape == b.shape, name
        assert np.abs(a - b).max() <= tol, (name, float(np.abs(a - b).max()))


def test_graph_structure(mnet_onnx, anchor):
    """checker passes; NCHW throughout: the only Transposes are the heads' permute(0, 2, 3, 1);
    the interface is the anchor's (names, dynamic axes, opset)."""
    model = onnx.load(str(mnet_onnx))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    transposes = [n for n in model.graph.node if n.op_type == "Transpose"]
    assert len(transposes) == 9  # 3 heads x 3 levels, as the anchor
    producer = {o: n for n in model.graph.node for o in n.output}
    for t in transposes:
        assert list(onnx.helper.get_attribute_value(t.attribute[0])) == [0, 2, 3, 1]
        conv = producer[t.input[0]]
        assert conv.op_type == "Conv" and "Head" in conv.name, conv.name
    ops = {n.op_type for n in model.graph.node}
    assert ops <= {"Conv", "LeakyRelu", "Relu", "Add", "Concat", "Shape", "Resize"} | {
        "Transpose",
        "Reshape",
        "Softmax",
    }
    assert sum(n.op_type == "Conv" for n in model.graph.node) == 56  # BatchNorm folded
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "input" and dims == ["n", 3, "h", "w"]
    for out, width in zip(model.graph.output, (4, 2, 10), strict=True):
        d = out.type.tensor_type.shape.dim
        assert [d[0].dim_param, d[2].dim_value] == ["n", width]
        assert d[1].dim_param and not d[1].dim_value  # P dynamic


def test_batchnorm_nodes_and_opsets(mnet, anchor):
    """``fold_batchnorm=False`` (BatchNormalization nodes) and the lowest / latest opsets give
    the same outputs; an opset below 13 is refused with a message."""
    x = _input(np.random.default_rng(1), 2, 75, 93)
    ref = anchor.run(None, {"input": x})
    latest = onnx.defs.onnx_opset_version()
    for options in ({"fold_batchnorm": False}, {"opset": 13}, {"opset": latest}):
        proto = build_onnx(mnet, **options)
        onnx.checker.check_model(proto, full_check=True)
        ours = _session(proto.SerializeToString()).run(None, {"input": x})
        for a, b, tol in zip(ours, ref, (5e-4, 2e-5, 5e-4), strict=True):
            assert np.abs(a - b).max() <= tol, options
    bn = build_onnx(mnet, fold_batchnorm=False)
    assert sum(n.op_type == "BatchNormalization" for n in bn.graph.node) == 56 - 9
    with pytest.raises(ValueError, match="opset: expected an int in 13"):
        build_onnx(mnet, opset=12)
    with pytest.raises(TypeError, match="expected a RetinaFace"):
        build_onnx(mnet.body)


def test_resnet50_seeded_equals_model(tmp_path):
    """ResNet50 (seeded weights, random BatchNorm statistics so that folding is exercised) equals
    ``model(x)`` (NHWC, conf softmaxed) on an odd size, batch 2."""
    model = RetinaFace("resnet50", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, BatchNorm2d):
            n = m.num_features
            m.mean.set_value(jax.device_put(rng.normal(0, 0.1, n).astype(np.float32)))
            m.var.set_value(jax.device_put(rng.uniform(0.5, 1.5, n).astype(np.float32)))
            m.scale.set_value(jax.device_put(rng.uniform(0.5, 1.0, n).astype(np.float32)))
            m.bias.set_value(jax.device_put(rng.normal(0, 0.1, n).astype(np.float32)))
    model.eval()
    path = tmp_path / "r50.onnx"
    export_onnx(model, path)
    x = _input(rng, 2, 71, 97)
    # jitted: one compilation instead of one per eager op (the same function, faster)
    loc, logits, landms = nnx.jit(lambda m, x: m(x))(model, x.transpose(0, 2, 3, 1))
    ref = [np.asarray(loc), np.asarray(jax.nn.softmax(logits, -1)), np.asarray(landms)]
    ours = _session(path).run(None, {"input": x})
    for a, b, tol in zip(ours, ref, (1e-4, 1e-5, 1e-4), strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tol, float(np.abs(a - b).max())
    assert sum(n.op_type == "Transpose" for n in onnx.load(str(path)).graph.node) == 9


def _rows(faces) -> np.ndarray:
    return np.array([f.to_row() for f in faces], np.float32).reshape(-1, 15)


def test_detections_recipe_equals_detector(shared, mnet_onnx):
    """``OnnxDetector`` (our priors, decode and NMS on the exported outputs) gives the
    ``Detector``'s detections on the shared images, on our export and on the anchor."""
    detector = Detector.from_pretrained(shared / WEIGHTS)
    images = [shared / "data/images" / n for n in ("biubug6_curve_test.jpg", "kinghoowei_timg.jpg")]
    for model in (mnet_onnx, shared / ANCHOR):
        onnx_detector = OnnxDetector(model)
        for image in images:
            want, got = _rows(detector.detect(image)), _rows(onnx_detector.detect(image))
            assert len(got) == len(want) > 50, image
            np.testing.assert_allclose(got[:, 4], want[:, 4], atol=1e-5)
            np.testing.assert_allclose(got[:, :4], want[:, :4], atol=2e-3)
            np.testing.assert_allclose(got[:, 5:], want[:, 5:], atol=2e-3)
    # a batch through decode_onnx_outputs, with a resize factor per image and a keep_top_k
    img = load_image(images[0])
    x = np.concatenate([onnx_input(img, detector.cfg, 0.5)] * 2)
    outputs = _session(mnet_onnx).run(None, {"input": x})
    rows = decode_onnx_outputs(outputs, x.shape[2:], resize=[0.5, 1.0], keep_top_k=20)
    assert len(rows[0]) == len(rows[1]) == 20
    np.testing.assert_allclose(rows[0][:, :4], 2 * rows[1][:, :4], rtol=1e-6)
    with pytest.raises(ValueError, match="give the size the model was run on"):
        decode_onnx_outputs(outputs, (100, 100))


def test_cli_onnx(shared, tmp_path, anchor, capsys):
    out = tmp_path / "cli.onnx"
    assert cli.main(["onnx", str(out), "--weights", str(shared / WEIGHTS), "--opset", "17"]) == 0
    assert "wrote" in capsys.readouterr().out
    x = _input(np.random.default_rng(2), 1, 64, 48)
    got, ref = _session(out).run(None, {"input": x})[1], anchor.run(None, {"input": x})[1]
    assert np.abs(got - ref).max() <= 2e-5
    for argv, message in (
        (["--opset", "11"], "opset: expected an int in 13"),
        (["--quantize", "int8"], "--quantize int8 needs --calibration DIR"),
        (["--calibration", str(tmp_path)], "apply only with --quantize int8"),
        (["--quantize", "int8", "--calibration", str(tmp_path / "no")], "not a directory"),
    ):
        assert cli.main(["onnx", str(out), "--weights", str(shared / WEIGHTS), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert cli.main(["onnx", str(tmp_path / "missing/x.onnx")]) == 2
    assert "output directory" in capsys.readouterr().err


def test_cli_stablehlo_arguments(monkeypatch, tmp_path, capsys):
    """The stablehlo subcommand passes --weights / --backbone / --platforms / --sizes on."""
    from retinaface_jax.export import stablehlo

    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return path

    monkeypatch.setattr(stablehlo, "export_stablehlo", fake)
    out = tmp_path / "p.npz"
    argv = ["stablehlo", str(out), "--backbone", "resnet50", "--platforms", "cpu,cuda"]
    assert cli.main([*argv, "--sizes", "480x640,33x65"]) == 0
    assert calls == [
        (
            out,
            {
                "weights": None,
                "backbone": "resnet50",
                "platforms": ("cpu", "cuda"),
                "sizes": [(480, 640), (33, 65)],
            },
        )
    ]
    assert cli.main(["stablehlo", str(out), "--sizes", "any"]) == 0
    assert calls[-1][1]["sizes"] is None and calls[-1][1]["backbone"] == "mobilenet0.25"
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line
        cli.main(["stablehlo", str(out), "--sizes", "480"])
    assert exit_info.value.code == 2
    assert "expected HxW" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_cli_missing_dependency(monkeypatch, tmp_path, capsys, module):
    """Without the [export] extra: one line naming the package and what to install."""
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    argv = ["onnx", str(tmp_path / "x.onnx")]
    if module == "onnxruntime":
        argv += ["--quantize", "int8", "--calibration", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"'{module}'" in err and "pip install 'retinaface_jax[export]'" in err


def test_import_does_not_load_onnx():
    """``import retinaface_jax.export`` (and the package) costs neither onnx nor onnxruntime."""
    code = (
        "import sys, retinaface_jax, retinaface_jax.export; "
        "print(sorted(m for m in ('onnx', 'onnxruntime') if m in sys.modules)); "
        "from retinaface_jax.export.onnx_export import export_onnx; "
        "assert retinaface_jax.export_onnx is retinaface_jax.export.export_onnx is export_onnx"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_int8_smoke(shared, tmp_path, mnet_onnx):
    """``--quantize int8 --calibration DIR`` on a few images: a QDQ model that still finds the
    clear faces of the float export."""
    calib = tmp_path / "calib"
    calib.mkdir()
    for name in ("fd1mb_ncnn_sample.jpg", "biubug6_curve_test.jpg"):
        shutil.copy(shared / "data/images" / name, calib / name)
    out = tmp_path / "int8.onnx"
    argv = ["onnx", str(out), "--weights", str(shared / WEIGHTS), "--quantize", "int8"]
    assert cli.main([*argv, "--calibration", str(calib)]) == 0
    graph = onnx.load(str(out)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    # the stem stays float (quantize.STEM): its weights are initialisers, not dequantized
    producer = {o: n for n in graph.node for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    assert convs["/body.stage1.0.0/Conv"].input[1] not in producer
    assert producer[convs["/body.stage2.0.3/Conv"].input[1]].op_type == "DequantizeLinear"
    assert out.stat().st_size < mnet_onnx.stat().st_size / 2
    image = shared / "data/images/biubug6_curve_test.jpg"
    ref = _rows(OnnxDetector(mnet_onnx).detect(image, conf_threshold=0.8))
    got = _rows(OnnxDetector(out).detect(image, conf_threshold=0.5))
    assert len(ref) > 20
    from retinaface_jax.evaluate.matching import pairwise_iou

    found = pairwise_iou(ref[:, :4], got[:, :4]).max(axis=1) >= 0.5
    assert found.mean() >= 0.95, found.mean()
