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

    def load_detector(weights, network, target_size, max_size, *, kernels="auto"):
        loaded.update(
            weights=weights, network=network, target=target_size, max=max_size, kernels=kernels
        )
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
    assert s.loaded == {
        "weights": None,
        "network": "mobilenet0.25",
        "target": None,
        "max": None,
        "kernels": "auto",
    }
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


def test_widerface_scale_and_kernel_options_reach_the_detector(widerface_setup):
    s = widerface_setup
    argv = ["widerface", "--images", str(s.root / "images"), "--gt", str(s.gt_dir)]
    argv += ["--pred-dir", str(s.root / "p2"), "--target-size", "1600", "--max-size", "2150"]
    argv += ["--weights", "w.pth", "--no-progress", "--kernels", "xla"]
    assert main(argv) == 0
    assert s.loaded == {
        "weights": "w.pth",
        "network": "mobilenet0.25",
        "target": 1600,
        "max": 2150,
        "kernels": "xla",
    }


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
    monkeypatch.setattr(run, "load_detector", lambda *a, **k: FakeDetector(boxes_by_height))
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


# --- errors for people: one line on stderr, exit 2, traceback only with --debug ---------------

PROG = "python -m retinaface_jax.evaluate"


def _assert_one_line_error(err, *parts):
    assert err.startswith(f"{PROG}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, (part, err)


def _write_pred(root, name, rows_text):
    path = root / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r for r in rows_text.splitlines() if r.strip()]
    path.write_text(f"{name.split('/')[1]}\n{len(lines)}\n{rows_text}")
    return path


def _widerface_argv(shared, pred):
    return ["widerface", "--gt", str(shared / "data/widerface/gt"), "--pred-dir", str(pred)]


def _image_where(gt, condition):
    return next(n for i, n in enumerate(gt.names) if condition(i))


def test_partial_set_prints_only_the_computable_settings(shared, tmp_path, capsys):
    gt = load_widerface_gt(shared / "data/widerface/gt")
    name = _image_where(
        gt, lambda i: gt.keep["hard"][i].sum() >= 2 and not gt.keep["medium"][i].any()
    )
    i = gt.index[name]
    x, y, w, h = gt.boxes[i][gt.keep["hard"][i]][0]
    _write_pred(tmp_path, name, f"{x} {y} {w} {h} 0.9\n1 2 -3 4 0.3\n")
    assert main(_widerface_argv(shared, tmp_path)) == 0
    out, err = capsys.readouterr()
    assert "nan" not in out.lower()
    for setting in ("Easy  ", "Medium"):
        s = setting.strip().lower()
        reason = f"no {s} ground-truth faces among the 1 evaluated image(s)"
        assert f"{setting} Val AP: skipped ({reason})" in out
    assert re.search(r"Hard +Val AP: 0\.\d{8}\n", out)
    # the negative width is evaluated like the official code, and said so on stderr
    assert err.startswith(f"{PROG}: warning: 1 prediction row(s) with a negative width")
    assert f"{name.split('/')[1]}.txt: line 4" in err


def test_nothing_computable_is_an_error(shared, tmp_path, capsys):
    gt = load_widerface_gt(shared / "data/widerface/gt")
    name = _image_where(gt, lambda i: not gt.keep["hard"][i].any())
    _write_pred(tmp_path, name, "1 2 3 4 0.9\n5 6 7 8 0.4\n")
    assert main(_widerface_argv(shared, tmp_path)) == 2
    out, err = capsys.readouterr()
    assert out.count("Val AP: skipped") == 3 and "nan" not in out.lower()
    _assert_one_line_error(err, "no WIDER FACE AP could be computed", "hard: no hard")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00", "line 1: not UTF-8"),
        (b"NAME\n1\n1 2 3 4 1.5\n", "line 3: score outside [0, 1]"),
        (b"NAME\n1\n1 2 3 4 nan\n", "line 3: non-finite"),
        (b"NAME\n2\n1 2 3 4 0.5\n", "header says 2 boxes, found 1"),
        (b"NAME\n1\n1 2 3 0.5\n", "line 3: expected 'x y w h score'"),
    ],
)
def test_bad_prediction_file_is_a_one_line_error(shared, tmp_path, capsys, data, message):
    name = "0--Parade/0_Parade_marchingband_1_465"
    path = tmp_path / f"{name}.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(data.replace(b"NAME", name.split("/")[1].encode()))
    assert main(_widerface_argv(shared, tmp_path)) == 2
    _assert_one_line_error(capsys.readouterr().err, str(path), message)


def test_missing_directories_are_one_line_errors(shared, tmp_path, capsys):
    assert main(_widerface_argv(shared, tmp_path / "nopred")) == 2
    _assert_one_line_error(capsys.readouterr().err, "prediction directory not found", "nopred")
    argv = ["widerface", "--gt", str(tmp_path / "nogt"), "--pred-dir", str(tmp_path)]
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, "nogt")
    folds = shared / "data" / "fddb" / "FDDB-folds"
    assert main(["fddb", "--folds", str(folds), "--dets", str(tmp_path / "none.txt")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "FDDB detection file not found", "none.txt")
    assert main(["fddb", "--folds", str(tmp_path / "nofolds"), "--dets", "x"]) == 2
    _assert_one_line_error(capsys.readouterr().err, "nofolds")


def test_bad_fddb_detection_file_is_a_one_line_error(shared, tmp_path, capsys):
    folds = shared / "data" / "fddb" / "FDDB-folds"
    dets = tmp_path / "dets.txt"
    dets.write_text("2002/08/11/big/img_591\n1.0\n10 20 -5 30 0.9\n")
    assert main(["fddb", "--folds", str(folds), "--fold", "1", "--dets", str(dets)]) == 2
    _assert_one_line_error(capsys.readouterr().err, str(dets), "line 3: negative width/height")


def test_flag_combinations_are_one_line_errors(widerface_setup, shared, capsys):
    s = widerface_setup
    argv = ["widerface", "--images", str(s.root / "images"), "--gt", str(s.gt_dir)]
    argv += ["--pred-dir", str(s.root / "p3"), "--origin-size", "--max-size", "2150"]
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, "--max-size cannot be combined")
    assert main(["widerface", "--gt", str(s.gt_dir)]) == 2
    _assert_one_line_error(capsys.readouterr().err, "give --images")
    assert main(["fddb", "--folds", str(shared / "data/fddb/FDDB-folds")]) == 2
    _assert_one_line_error(capsys.readouterr().err, "give --images")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "0"], "expected a positive integer, got '0'"),
        (["--target-size", "-3"], "expected a positive integer, got '-3'"),
        (["--max-size", "big"], "expected a positive integer, got 'big'"),
        (["--conf-threshold", "1.5"], "expected a number in [0, 1], got '1.5'"),
        (["--nms-threshold", "x"], "expected a number in [0, 1], got 'x'"),
    ],
)
def test_bad_option_values_are_usage_errors(tmp_path, capsys, option, message):
    argv = ["widerface", "--gt", str(tmp_path), "--pred-dir", str(tmp_path), *option]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option[0]}: {message}" in err and "Traceback" not in err


def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    argv = ["widerface", "--gt", str(tmp_path / "nogt"), "--pred-dir", str(tmp_path)]
    with pytest.raises(FileNotFoundError, match="nogt"):
        main([*argv, "--debug"])
    monkeypatch.setenv("RETINAFACE_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="nogt"):
        main(argv)


def test_module_entry_point_errors(tmp_path):
    argv = [sys.executable, "-m", "retinaface_jax.evaluate", "widerface"]
    argv += ["--gt", str(tmp_path / "nogt"), "--pred-dir", str(tmp_path)]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stdout == ""
    _assert_one_line_error(plain.stderr, "WIDER FACE ground truth directory not found")
    debug = subprocess.run([*argv, "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
