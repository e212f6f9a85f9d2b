"""FDDB: annotation parsing, ellipse bounding boxes, the original's detection file format, our
discrete ROC, and clear errors."""

from __future__ import annotations

import types

import numpy as np
import pytest

from retinaface_jax.evaluate.fddb import (
    ellipse_bounding_boxes,
    faces_to_fddb_rows,
    fddb_discrete_roc,
    format_fddb_detections,
    read_fddb_detections,
    read_fddb_ellipses,
    read_fddb_folds,
)
from retinaface_jax.evaluate.run import list_fddb_images


def test_ellipse_bounding_box_contains_the_ellipse_tightly():
    rng = np.random.default_rng(0)
    ell = np.column_stack(
        [
            rng.uniform(20, 80, 20),
            rng.uniform(5, 20, 20),
            rng.uniform(-3, 3, 20),
            rng.uniform(100, 200, 20),
            rng.uniform(100, 200, 20),
        ]
    )
    boxes = ellipse_bounding_boxes(ell)
    phi = np.linspace(0, 2 * np.pi, 20001)
    for (a, b, t, cx, cy), box in zip(ell, boxes, strict=True):
        x = cx + a * np.cos(phi) * np.cos(t) - b * np.sin(phi) * np.sin(t)
        y = cy + a * np.cos(phi) * np.sin(t) + b * np.sin(phi) * np.cos(t)
        np.testing.assert_allclose([x.min(), y.min(), x.max(), y.max()], box, atol=1e-3)
    # axis-aligned cases: angle 0 -> major along x, angle pi/2 -> major along y
    np.testing.assert_allclose(
        ellipse_bounding_boxes([[30, 10, 0, 100, 50], [30, 10, np.pi / 2, 100, 50]]),
        [[70, 40, 130, 60], [90, 20, 110, 80]],
        atol=1e-9,
    )


def test_fold_files_and_present_images(shared):
    fddb = shared / "data" / "fddb"
    ellipses = read_fddb_folds(fddb / "FDDB-folds", [1])
    assert len(ellipses) == 290
    present = read_fddb_ellipses(fddb / "FDDB-fold-01-ellipseList.present.txt")
    images, missing = list_fddb_images(fddb / "images", list(ellipses))
    assert list(images) == list(present) and missing == 8
    for name in present:
        np.testing.assert_array_equal(present[name], ellipses[name])
    all_folds = read_fddb_folds(fddb / "FDDB-folds")
    assert len(all_folds) == 2845 and sum(len(v) for v in all_folds.values()) == 5171


def test_detection_file_matches_original_format(tmp_path):
    faces = [
        types.SimpleNamespace(box=np.float32([10.7, 20.2, 50.9, 80.5]), score=0.987654321),
        types.SimpleNamespace(box=np.float32([0.2, 0.9, 5.5, 6.0]), score=0.02),
    ]
    rows = faces_to_fddb_rows(faces)
    # x = int(x1), w = int(x2 - x1 + 1) in float32, float32 score with 10 decimals (test_fddb.py)
    np.testing.assert_array_equal(rows[:, :4], [[10, 20, 41, 61], [0, 0, 6, 6]])
    text = format_fddb_detections({"2002/08/11/big/img_591": rows, "2002/07/19/big/img_423": []})
    assert text == (
        "2002/08/11/big/img_591\n2.0\n10 20 41 61 0.9876543283\n0 0 6 6 0.0199999996\n"
        "2002/07/19/big/img_423\n0.0\n"
    )
    path = tmp_path / "FDDB_dets.txt"
    path.write_text(text)
    back = read_fddb_detections(path)
    assert list(back) == ["2002/08/11/big/img_591", "2002/07/19/big/img_423"]
    np.testing.assert_allclose(back["2002/08/11/big/img_591"], rows, atol=1e-10)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("img\nthree\n", "line 2: expected the number of detections"),
        ("img\n2.0\n1 2 3 4 0.5\n", "line 4: expected 'x y w h score'"),
        ("img\n1.0\n1 2 3 0.5\n", "line 3: expected 'x y w h score'"),
        ("img\n2.0\n1 2 3 4 0.5\nimg2\n0.0\n", r"line 4: .* for img \(line 2 says 2\)"),
        ("img\n1.0\n1 2 3 4 0.5\n5 6 7 8 0.4\n", "line 4: expected an image path, got"),
        ("img\n1.0\n1 2 -3 4 0.5\n", "line 3: negative width/height for img"),
        ("img\n2.0\n1 2 3 4 0.5\n1 2 3 -4 0.5\n", "line 4: negative width/height"),
        ("img\n1.0\n1 2 3 4 1.5\n", r"line 3: score outside \[0, 1\]"),
        ("img\n1.0\n1 2 3 4 -0.5\n", r"line 3: score outside \[0, 1\]"),
        ("img\n1.0\n1 2 3 4 inf\n", "line 3: non-finite"),
        ("img\n1.0\nnan 2 3 4 0.5\n", "line 3: non-finite"),
        ("img\n0.0\nb\n0.0\nimg\n0.0\n", "line 5: image img listed twice"),
        ("img\n-1.0\n", "line 2: expected the number of detections"),
    ],
)
def test_malformed_detection_file_is_named(tmp_path, text, match):
    path = tmp_path / "dets.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_fddb_detections(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("data", "line"), [(b"\xff\xd8\xff\xe0JFIF", 1), (b"img\n1.0\n1 2 3 4 0.5\xe9\n", 3)]
)
def test_binary_detection_file_names_file_and_line(tmp_path, data, line):
    path = tmp_path / "dets.txt"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"line {line}: not UTF-8") as info:
        read_fddb_detections(path)
    assert str(path) in str(info.value)


def test_missing_detection_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="FDDB detection file not found: .*nothere.txt"):
        read_fddb_detections(tmp_path / "nothere.txt")


def test_malformed_ellipse_file_is_named(tmp_path):
    path = tmp_path / "FDDB-fold-01-ellipseList.txt"
    path.write_text("img\n2\n1 2 3 4 5 1\n")
    with pytest.raises(ValueError, match="line 4") as info:
        read_fddb_folds(tmp_path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="FDDB-fold-02-ellipseList.txt"):
        read_fddb_folds(tmp_path, [2])
    path.write_bytes(b"img\n1\n\x80\n")
    with pytest.raises(ValueError, match="line 3: not UTF-8") as info:
        read_fddb_folds(tmp_path)
    assert str(path) in str(info.value)


def _xywh(box):
    x1, y1, x2, y2 = box
    return [x1, y1, x2 - x1, y2 - y1]


def test_discrete_roc_counts():
    ell = {"a": np.array([[30, 20, np.pi / 2, 100, 100]]), "b": np.array([[30, 20, 0, 50, 50]] * 2)}
    box_a = ellipse_bounding_boxes(ell["a"])[0]
    box_b = ellipse_bounding_boxes(ell["b"])[0]
    dets = {
        "a": np.array([_xywh(box_a) + [0.9], _xywh(box_a + 3) + [0.8], [0, 0, 5, 5, 0.95]]),
        "b": np.array([_xywh(box_b) + [0.7]]),  # two identical faces, one detection
    }
    roc = fddb_discrete_roc(dets, ell)
    assert roc.num_faces == 3 and roc.num_images == 2
    # descending scores 0.95 (FP), 0.9 (TP), 0.8 (FP: face a already taken), 0.7 (TP)
    np.testing.assert_array_equal(roc.scores, [0.95, 0.9, 0.8, 0.7])
    np.testing.assert_array_equal(roc.false_positives, [1, 1, 2, 2])
    np.testing.assert_array_equal(roc.true_positives, [0, 1, 1, 2])
    assert roc.tpr_at(0) == 0.0 and roc.tpr_at(1) == pytest.approx(1 / 3)
    assert roc.tpr_at(2) == pytest.approx(2 / 3)
    with pytest.raises(KeyError, match="'c'"):
        fddb_discrete_roc({"c": np.zeros((0, 5))}, ell)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (
            [[0, 0, 5, 5, 0.9], [0, 0, -5, 5, 0.8]],
            r"detections\['a'\] row 1: negative width/height",
        ),
        ([[0, 0, 5, 5, 1.5]], r"row 0: score outside \[0, 1\]"),
        ([[0, 0, np.nan, 5, 0.5]], "row 0: non-finite"),
        ([[0, 0, 5, 5]], r"expected shape \[N, 5\]"),
    ],
)
def test_discrete_roc_rejects_invalid_detections(rows, match):
    ell = {"a": np.array([[30, 20, 0, 50, 50]])}
    with pytest.raises(ValueError, match=match):
        fddb_discrete_roc({"a": np.array(rows, dtype=float)}, ell)
