"""Annotation parsing: real WIDER FACE train labels and synthetic files with every kind of defect."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from retinaface_jax.data.labels import load_records

LANDMARKS = "10.0 12.0 0.0 30.0 12.0 0.0 20.0 20.0 0.0 12.0 30.0 0.0 28.0 30.0 0.0 0.9"
NO_LANDMARKS = " ".join(["-1.0"] * 15) + " 0.3"


def _image(path: Path, h: int = 60, w: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


@pytest.fixture
def train_dir(shared: Path) -> Path:
    return shared / "data" / "widerface" / "train"


def test_real_label_txt_and_bbx_gt_agree(train_dir: Path) -> None:
    recs, report = load_records(train_dir / "label.txt")
    gt_recs, gt_report = load_records(train_dir / "wider_face_train_bbx_gt.txt")
    assert report.issues == [] and gt_report.issues == []
    assert len(recs) == 293 and report.faces == 1535 and gt_report.faces == 1535
    for r in recs:
        assert Path(r.path).is_file() and r.size is not None
    by_path = {r.path: r for r in gt_recs}
    for r in recs:
        np.testing.assert_array_equal(r.boxes, by_path[r.path].boxes)
        assert np.all(by_path[r.path].labels == -1)
    # label 1 exactly where the file has landmarks; landmarks of -1 faces are zero
    labels = np.concatenate([r.labels for r in recs])
    lms = np.concatenate([r.landmarks for r in recs])
    text = (train_dir / "label.txt").read_text().splitlines()
    raw = np.array([[float(v) for v in s.split()] for s in text if not s.startswith("#")])
    np.testing.assert_array_equal(labels, np.where(raw[:, 4] < 0, -1.0, 1.0))
    assert np.all(lms[labels < 0] == 0)
    np.testing.assert_allclose(
        lms[labels > 0], raw[raw[:, 4] >= 0][:, [4, 5, 7, 8, 10, 11, 13, 14, 16, 17]], rtol=1e-6
    )
    # the original's convention: x2 = x + w, y2 = y + h
    boxes = np.concatenate([r.boxes for r in recs])
    np.testing.assert_array_equal(boxes, np.concatenate([raw[:, :2], raw[:, :2] + raw[:, 2:4]], 1))


def test_label_txt_defects_are_reported_and_skipped(tmp_path: Path) -> None:
    _image(tmp_path / "images" / "a" / "ok.jpg")
    _image(tmp_path / "images" / "a" / "empty.jpg")
    (tmp_path / "images" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    lines = [
        "1 2 3 4",  # 1: before any header
        "# a/ok.jpg",  # 2
        f"5 6 30 25 {LANDMARKS}",  # 3: good, landmarks
        "40 10 20 20",  # 4: good, 4 numbers -> label -1
        f"10 10 20 20 {NO_LANDMARKS}",  # 5: good, -1 landmarks
        "10 10 twenty 20",  # 6: not a number
        "10 10 20",  # 7: too few numbers
        f"nan 10 20 20 {LANDMARKS}",  # 8: NaN
        "10 10 0 20",  # 9: zero width
        "10 10 20 -3",  # 10: negative height
        "70 10 20 20",  # 11: x2 = 90 > width 80
        "# a/empty.jpg",  # 12: no faces -> pure negative
        "# a/missing.jpg",  # 13
        "1 1 5 5",  # 14: skipped with its missing image
        "# a/broken.jpg",  # 15
        "",
    ]
    (tmp_path / "label.txt").write_text("\n".join(lines))
    recs, report = load_records(tmp_path / "label.txt")
    assert [Path(r.path).name for r in recs] == ["ok.jpg", "empty.jpg"]
    ok, empty = recs
    assert ok.size == (60, 80) and empty.num_faces == 0
    np.testing.assert_array_equal(ok.boxes, [[5, 6, 35, 31], [40, 10, 60, 30], [10, 10, 30, 30]])
    np.testing.assert_array_equal(ok.labels, [1, -1, -1])
    np.testing.assert_array_equal(ok.landmarks[0], [10, 12, 30, 12, 20, 20, 12, 30, 28, 30])
    assert np.all(ok.landmarks[1:] == 0)
    got = sorted((i.line, i.kind) for i in report.issues)
    assert got == [
        (1, "bad_line"),
        (6, "bad_line"),
        (7, "bad_line"),
        (8, "nan"),
        (9, "non_positive_size"),
        (10, "non_positive_size"),
        (11, "outside_image"),
        (13, "missing_image"),
        (15, "unreadable_image"),
    ]
    assert all(i.file == str(tmp_path / "label.txt") for i in report.issues)
    assert report.images == 2 and report.faces == 3 and report.empty_images == 1
    assert "missing_image=1" in report.summary()


def test_bbx_gt_format_with_empty_images_and_defects(tmp_path: Path) -> None:
    for name in ("x/one.jpg", "x/zero.jpg", "x/two.jpg", "x/bad.jpg", "x/last.jpg"):
        _image(tmp_path / "img" / name)
    lines = [
        "x/one.jpg",  # 1
        "1",
        "1 2 10 12 0 0 0 0 0 0 ",  # 3
        "x/zero.jpg",  # 4
        "0",
        "0 0 0 0 0 0 0 0 0 0 ",  # 6: dummy line
        "x/two.jpg",  # 7
        "2",
        "3 4 5 0 2 0 0 1 0 0 ",  # 9: zero height
        "3 4 a 6 2 0 0 0 0 0 ",  # 10: bad number
        "x/bad.jpg",  # 11
        "many",  # 12: bad count
        "x/last.jpg",  # 13
        "2",
        "1 1 4 4 0 0 0 0 0 0",  # 15; file ends before the 2nd face
    ]
    (tmp_path / "gt.txt").write_text("\n".join(lines) + "\n")
    recs, report = load_records(tmp_path / "gt.txt", tmp_path / "img")
    names = [Path(r.path).name for r in recs]
    assert names == ["one.jpg", "zero.jpg", "two.jpg", "last.jpg"]
    np.testing.assert_array_equal(recs[0].boxes, [[1, 2, 11, 14]])
    assert recs[0].labels.tolist() == [-1.0]
    assert recs[1].num_faces == 0 and recs[2].num_faces == 0 and recs[3].num_faces == 1
    kinds = sorted((i.line, i.kind) for i in report.issues)
    assert kinds[:3] == [(9, "non_positive_size"), (10, "bad_line"), (12, "bad_line")]
    assert len(kinds) == 4 and kinds[3] == (15, "bad_line")
    assert any("ended before" in i.message and "last.jpg" in i.message for i in report.issues)


def test_unreadable_annotation_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothere.txt"):
        load_records(tmp_path / "nothere.txt")
