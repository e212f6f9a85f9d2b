"""``python -m retinaface_jax.evaluate``: the pipeline around the detector, with a tiny fake
detector (the real one is exercised in test_evaluate_detector_ap.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest

from retinaface_jax.evaluate import run
from retinaface_jax.evaluate.__main__ import main
from retinaface_jax.evaluate.fddb import ellipse_bounding_boxes, read_fddb_folds
from retinaface_jax.evaluate.predictions_io import read_predictions
from retinaface_jax.evaluate.widerface_gt import load_widerface_gt


class FakeDetector:
    """Returns given x1,y1,x2,y2 boxes for an image, recognised by its (unique) height."""

    cfg = types.SimpleNamespace(conf_threshold=0.02, nms_threshold=0.4)

    def __init__(self, boxes_by_height):
        self.boxes_by_height = boxes_by_height
        self.calls = []

    def detect_batch(self, images, conf_threshold, nms_threshold, top_k, keep_top_k):
        self.calls.append((len(images), conf_threshold, nms_threshold, top_k, keep_top_k))
        out = []
        for img in images:
            assert img.dtype == np.uint8 and img.ndim == 3
            boxes = self.boxes_by_height[img.shape[0]]
            scores = np.linspace(0.99, 0.5, len(boxes)) if len(boxes) else []
            out.append(
                [
                    types.SimpleNamespace(box=np.float32(b), score=float(np.float32(s)))
                    for b, s in zip(boxes, scores, strict=True)
                ]
            )
        return out


def _write_image(path, height):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, 20, 3), 128, np.uint8))


@pytest.fixture
def widerface_setup(shared, tmp_path, monkeypatch):
    gt_dir = shared / "data" / "widerface" / "gt"
    gt = load_widerface_gt(gt_dir)
    names = [n for n in gt.names if n.startswith("19--Couple/")][:2]
    boxes_by_height = {}
    for h, name in enumerate(names, start=10):
        _write_image(tmp_path / "images" / f"{name}.jpg", h)
        xywh = gt.boxes[gt.index[name]]
        boxes_by_height[h] = np.column_stack([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]])
    bad = [n for n in gt.names if n.startswith("19--Couple/")][2]
    (tmp_path / "images" / f"{bad}.jpg").write_bytes(b"not a jpeg")
    fake = FakeDetector(boxes_by_height)
    loaded = {}

    def load_detector(weights, network, target_size, max_size):
        loaded.update(weights=weights, network=network, target=target_size, max=max_size)
        return fake

    monkeypatch.setattr(run, "load_detector", load_detector)
    return types.SimpleNamespace(
        gt_dir=gt_dir, names=names, bad=bad, fake=fake, loaded=loaded, root=tmp_path
    )


def test_widerface_detect_write_evaluate(widerface_setup, capsys):
    s = widerface_setup
    pred = s.root / "pred"
    argv = ["widerface", "--images", str(s.root / "images"), "--gt", str(s.gt_dir)]
    argv += ["--pred-dir", str(pred), "--plot", str(s.root / "pr.png"), "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert s.loaded == {"weights": None, "network": "mobilenet0.25", "target": None, "max": None}
    # no top-k limits, the config's thresholds
    assert all(c[1:] == (0.02, 0.4, None, None) for c in s.fake.calls)
    assert f"{s.bad}.jpg" in err  # the unreadable image is reported and skipped
    assert "1 image(s) failed" in out
    assert "evaluated 2 of 3226 WIDER FACE val images" in out
    assert "protocol: WIDER FACE val, official evaluation" in out
    for setting in ("Easy", "Medium", "Hard"):  # perfect boxes on the two images -> AP 1
        assert re.search(rf"{setting} +Val AP: 1\.00000000", out)
    assert re.search(r"evaluation time: [0-9.]+ s", out)
    assert (s.root / "pr.png").stat().st_size > 0
    files = sorted(pred.glob("*/*.txt"))
    assert [f"{f.parent.name}/{f.stem}" for f in files] == sorted(s.names)
    lines = files[0].read_text().splitlines()
    assert lines[0] == files[0].stem and int(lines[1]) == len(lines) - 2
    assert all(line.endswith(" ") for line in lines[2:])  # the original's trailing space

    # a second run must not overwrite the files
    before = {f: f.read_text() for f in files}
    assert main(argv) == 2
    assert "already exist" in capsys.readouterr().err
    assert {f: f.read_text() for f in files} == before
    # --pred-dir alone evaluates the existing files
    assert main(["widerface", "--gt", str(s.gt_dir), "--pred-dir", str(pred)]) == 0
    assert "evaluated 2 of 3226" in capsys.readouterr().out
    assert len(read_predictions(pred)) == 2


def test_widerface_scale_options_reach_the_detector(widerface_setup):
    s = widerface_setup
    argv = ["widerface", "--images", str(s.root / "images"), "--gt", str(s.gt_dir)]
    argv += ["--pred-dir", str(s.root / "p2"), "--target-size", "1600", "--max-size", "2150"]
    argv += ["--weights", "w.pth", "--no-progress"]
    assert main(argv) == 0
    assert s.loaded == {"weights": "w.pth", "network": "mobilenet0.25", "target": 1600, "max": 2150}


def test_reference_predictions_via_cli(shared, capsys):
    text = (shared / "golden" / "README.md").read_text()
    expected = [
        float(v)
        for v in re.search(r"easy ([0-9.]+), medium ([0-9.]+), hard ([0-9.]+)", text).groups()
    ]
    ref = shared / "golden" / "reference_widerface_val_subset_origin_size"
    gt_dir = shared / "data" / "widerface" / "gt"
    assert main(["widerface", "--gt", str(gt_dir), "--pred-dir", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "evaluated 403 of 3226" in out
    got = [
        float(re.search(rf"{k} +Val AP: ([0-9.]+)", out).group(1))
        for k in ("Easy", "Medium", "Hard")
    ]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_plot_without_matplotlib_is_a_clear_error(shared, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    ref = shared / "golden" / "reference_widerface_val_subset_origin_size"
    argv = ["widerface", "--gt", str(shared / "data/widerface/gt"), "--pred-dir", str(ref)]
    assert main([*argv, "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'retinaface-jax[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_bad_inputs_are_reported(shared, tmp_path, capsys):
    gt_dir = shared / "data" / "widerface" / "gt"
    (tmp_path / "images" / "0--Parade").mkdir(parents=True)
    _write_image(tmp_path / "images" / "0--Parade" / "not_a_val_image.jpg", 8)
    argv = ["widerface", "--images", str(tmp_path / "images"), "--gt", str(gt_dir)]
    assert main(argv) == 2
    assert "0--Parade/not_a_val_image" in capsys.readouterr().err
    assert main(["widerface", "--gt", str(tmp_path / "nogt"), "--pred-dir", str(tmp_path)]) == 2
    assert "nogt" in capsys.readouterr().err


def test_fddb_detect_write_roc(shared, tmp_path, monkeypatch, capsys):
    folds = shared / "data" / "fddb" / "FDDB-folds"
    ellipses = read_fddb_folds(folds, [1])
    names = list(ellipses)[:2]
    boxes_by_height = {}
    for h, name in enumerate(names, start=10):
        _write_image(tmp_path / "images" / f"{name}.jpg", h)
        boxes_by_height[h] = ellipse_bounding_boxes(ellipses[name])
    monkeypatch.setattr(run, "load_detector", lambda *a: FakeDetector(boxes_by_height))
    out_dir = tmp_path / "out"
    argv = ["fddb", "--images", str(tmp_path / "images"), "--folds", str(folds), "--fold", "1"]
    argv += ["--out", str(out_dir), "--plot", str(tmp_path / "roc.png"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "2 of 290 annotated images present" in out
    assert "protocol: FDDB, our discrete ROC" in out
    assert "TPR at <=    0 false positives: 1.0000" in out
    dets = (out_dir / "FDDB_dets.txt").read_text().splitlines()
    assert dets[0] == names[0] and dets[1] == f"{len(ellipses[names[0]])}.0"
    assert re.fullmatch(r"-?\d+ -?\d+ \d+ \d+ \d\.\d{10}", dets[2])
    assert (out_dir / "DiscROC_ours.txt").read_text().startswith("0.")
    assert (tmp_path / "roc.png").stat().st_size > 0
    # existing detections are not overwritten; --dets re-evaluates them
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    argv2 = ["fddb", "--folds", str(folds), "--dets", str(out_dir / "FDDB_dets.txt")]
    assert main([*argv2, "--out", str(out_dir)]) == 0
    assert "evaluated 2 images" in capsys.readouterr().out


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "retinaface_jax.evaluate", "widerface", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--pred-dir" in out and "--origin-size" in out and "--plot" in out


def test_failing_image_is_reported_and_the_batch_carries_on(tmp_path, capsys):
    class Flaky(FakeDetector):
        def detect_batch(self, images, **kw):
            if any(img.shape[0] == 11 for img in images):
                raise RuntimeError("boom")
            return super().detect_batch(images, **kw)

    paths = {}
    for h in (10, 11, 12):
        paths[f"e/img_{h}"] = tmp_path / f"img_{h}.jpg"
        _write_image(paths[f"e/img_{h}"], h)
    fake = Flaky({10: [[1, 1, 5, 5]], 12: []})
    results, failed = run.detect_images(
        fake,
        paths,
        lambda faces: np.array([f.box for f in faces]).reshape(-1, 4),
        conf_threshold=0.02,
        nms_threshold=0.4,
        batch_size=3,
        progress=False,
    )
    assert failed == ["e/img_11"]
    assert set(results) == {"e/img_10", "e/img_12"}
    err = capsys.readouterr().err
    assert "retrying" in err and "img_11.jpg" in err and "boom" in err
