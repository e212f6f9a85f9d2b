"""Prediction txt files: the original's exact format, exact round trips, clear errors naming the
file for malformed or truncated files and wrong layouts."""

from __future__ import annotations

import types

import numpy as np
import pytest

from retinaface_jax.evaluate.predictions_io import (
    faces_to_rows,
    format_prediction_file,
    read_prediction_file,
    read_predictions,
    write_predictions,
)


def _face(box, score):
    return types.SimpleNamespace(box=np.asarray(box, np.float32), score=float(np.float32(score)))


def test_detector_rows_use_original_truncation_and_score_text():
    faces = [_face([84.9, 539.7, 98.2, 558.99], 0.9872032), _face([-3.5, 2.2, 10.7, 20.1], 0.02)]
    rows = faces_to_rows(faces)
    # int() truncates toward zero; w = int(x2) - int(x1)
    np.testing.assert_array_equal(rows[:, :4], [[84, 539, 14, 19], [-3, 2, 13, 18]])
    text = format_prediction_file("0_Parade_Parade_0_102", rows)
    assert text == "0_Parade_Parade_0_102\n2\n84 539 14 19 0.9872032 \n-3 2 13 18 0.02 \n"


def test_original_reference_files_reformat_byte_identical(shared):
    """Every file the original wrote for the 403 images is reproduced byte for byte from its rows
    (integers + the float32 score printed like ``str(np.float32)``)."""
    ref = shared / "golden" / "reference_widerface_val_subset_origin_size"
    files = sorted(ref.glob("*/*.txt"))
    assert len(files) == 403
    for path in files:
        name, rows = read_prediction_file(path)
        assert format_prediction_file(name, rows.astype(np.float32)) == path.read_text(), path


def test_float64_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    preds = {
        "0--Parade/a_1": np.column_stack([rng.random((7, 4)) * 500, rng.random(7)]),
        "0--Parade/a_2": np.zeros((0, 5)),
        "12--Group/b_3": np.array([[1.0, 2.0, 3.0, 4.0, 1.0]]),
    }
    write_predictions(tmp_path, preds)
    back = read_predictions(tmp_path)
    assert set(back) == set(preds)
    for k in preds:
        np.testing.assert_array_equal(back[k], preds[k])


def test_write_refuses_to_overwrite(tmp_path):
    preds = {"0--Parade/a_1": np.array([[1.0, 2, 3, 4, 0.5]])}
    write_predictions(tmp_path, preds)
    before = (tmp_path / "0--Parade" / "a_1.txt").read_text()
    with pytest.raises(FileExistsError, match="a_1.txt"):
        write_predictions(tmp_path, {"0--Parade/a_1": np.zeros((0, 5))})
    assert (tmp_path / "0--Parade" / "a_1.txt").read_text() == before
    write_predictions(tmp_path, {"0--Parade/a_1": np.zeros((0, 5))}, overwrite=True)
    assert read_predictions(tmp_path)["0--Parade/a_1"].shape == (0, 5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "truncated prediction file"),
        ("img_1\n", "truncated prediction file"),
        ("img_1\nthree\n1 2 3 4 0.5\n", "line 2: expected the number of boxes"),
        ("img_1\n2\n1 2 3 4 0.5\n", "header says 2 boxes, found 1"),
        ("img_1\n1\n1 2 3 x 0.5\n", "line 3: expected 'x y w h score'"),
        ("img_1\n1\n1 2 3 4\n", "line 3: expected 'x y w h score'"),
        ("img_2\n0\n", "names image 'img_2' but the file is img_1.txt"),
        ("img_1\n1\n1 2 3 4 nan\n", "line 3: non-finite"),
        ("img_1\n2\n1 2 3 4 0.5\ninf 2 3 4 0.5\n", "line 4: non-finite"),
        ("img_1\n1\n1 2 3 4 1.5\n", r"line 3: score outside \[0, 1\]"),
        ("img_1\n2\n1 2 3 4 0.5\n1 2 3 4 -0.01\n", r"line 4: score outside \[0, 1\]"),
        ("img_1\n-1\n", "line 2: expected the number of boxes"),
        ("img_1\n0\n1 2 3 4 0.5\n", "header says 0 boxes, found 1"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "0--Parade" / "img_1.txt"
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        read_predictions(tmp_path)
    assert str(path) in str(info.value)


def test_name_line_may_hold_a_path_with_extension(tmp_path):
    path = tmp_path / "0--Parade" / "img_1.txt"
    path.parent.mkdir()
    path.write_text("0--Parade/img_1.jpg\n1\n1 2 3 4 0.5 extra\n")
    np.testing.assert_array_equal(
        read_predictions(tmp_path)["0--Parade/img_1"], [[1, 2, 3, 4, 0.5]]
    )


def test_directory_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_predictions(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no prediction files"):
        read_predictions(tmp_path)
    (tmp_path / "stray.txt").write_text("x\n0\n")
    with pytest.raises(ValueError, match="stray.txt"):
        read_predictions(tmp_path)


def test_bad_keys_rejected_on_write(tmp_path):
    with pytest.raises(ValueError, match="event/image"):
        write_predictions(tmp_path, {"no_event": np.zeros((0, 5))})


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", 1),  # an image saved as .txt
        (b"img_1\n1\n1 2 3 4 0.5\xff\n", 3),
    ],
)
def test_binary_file_names_file_and_line(tmp_path, data, line):
    path = tmp_path / "0--Parade" / "img_1.txt"
    path.parent.mkdir()
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"line {line}: not UTF-8") as info:
        read_predictions(tmp_path)
    assert str(path) in str(info.value)


def test_negative_sizes_are_kept_with_a_warning_naming_file_and_line(tmp_path):
    """The official evaluation scores them (boxes covering ~nothing); its golden set has some."""
    for image in ("img_1", "img_2"):
        path = tmp_path / "0--Parade" / f"{image}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f"{image}\n2\n1 2 3 4 0.9\n5 6 -1.5 4 0.5\n")
    with pytest.warns(UserWarning, match=r"2 prediction row\(s\) .*/img_1.txt: line 4") as rec:
        preds = read_predictions(tmp_path)
    assert len(rec) == 1  # one warning for the whole set
    np.testing.assert_array_equal(preds["0--Parade/img_2"][1], [5, 6, -1.5, 4, 0.5])
    with pytest.warns(UserWarning, match="img_2.txt: line 4"):
        read_prediction_file(tmp_path / "0--Parade" / "img_2.txt")


def test_missing_or_directory_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="prediction file not found: .*img_9.txt"):
        read_prediction_file(tmp_path / "img_9.txt")
    (tmp_path / "e" / "img_1.txt").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="img_1.txt: is a directory"):
        read_predictions(tmp_path)
