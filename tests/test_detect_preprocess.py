"""Image input normalisation, resize rules and Face serialisation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from retinaface_jax.image_header import image_file_size
from retinaface_jax.inference.face import Face
from retinaface_jax.inference.preprocess import (
    ImageError,
    load_image,
    max_pixels_limit,
    resize_factor,
    to_network_input,
)

RNG = np.random.default_rng(0)
BGR = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_arrays_bgr_rgb_gray_bgra_16bit():
    np.testing.assert_array_equal(load_image(BGR), BGR)
    np.testing.assert_array_equal(load_image(BGR[:, :, ::-1], rgb=True), BGR)
    gray = BGR[:, :, 0]
    for g in (gray, gray[:, :, None]):
        out = load_image(g)
        assert out.shape == (20, 30, 3) and (out == gray[:, :, None]).all()
    bgra = np.concatenate([BGR, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(bgra), BGR)
    rgba = np.concatenate([BGR[:, :, ::-1], np.zeros((20, 30, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba, rgb=True), BGR)
    b16 = BGR.astype(np.uint16) * 257
    np.testing.assert_array_equal(load_image(b16), BGR)
    assert load_image(BGR.astype(np.float64)).dtype == np.float32


def test_files_any_depth(tmp_path):
    cv2.imwrite(str(tmp_path / "c.png"), BGR)
    cv2.imwrite(str(tmp_path / "g.png"), BGR[:, :, 1])
    cv2.imwrite(str(tmp_path / "a.png"), np.dstack([BGR, np.full((20, 30), 9, np.uint8)]))
    cv2.imwrite(str(tmp_path / "w.png"), BGR.astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(tmp_path / "c.png"), BGR)
    np.testing.assert_array_equal(load_image(str(tmp_path / "g.png"))[:, :, 2], BGR[:, :, 1])
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), BGR)
    np.testing.assert_array_equal(load_image(tmp_path / "w.png"), BGR)
    # rgb=True does not apply to files (always decoded as BGR)
    np.testing.assert_array_equal(load_image(tmp_path / "c.png", rgb=True), BGR)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros(10, np.uint8), "shape"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.array([["a", "b"]]), "numeric"),
        (np.zeros((4, 4), bool), "numeric"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.full((4, 4), 300, np.int32), "0..255"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
def test_bad_arrays_clear_errors(bad, match):
    with pytest.raises(ImageError, match=match):
        load_image(bad)


def test_bad_files_named(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("notes.jpg", "empty.png", "missing.jpg"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)


def test_float64_beyond_float32_range_is_refused():
    """Finite float64 values that overflow float32 would become inf: refused, naming the input."""
    big = np.full((4, 4, 3), 1e300)
    with pytest.raises(ImageError, match="my.array: .*float32's range"):
        load_image(big, name="my.array")
    assert load_image(np.full((4, 4, 3), 3e38)).dtype == np.float32  # in range: fine


# (suffix, imwrite params, channels, dtype); every format OpenCV here decodes
FORMATS = [
    (".png", [], 3, np.uint8),
    (".jpg", [], 3, np.uint8),
    (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], 3, np.uint8),
    (".bmp", [], 3, np.uint8),
    (".webp", [], 3, np.uint8),
    (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], 3, np.uint8),  # lossless (VP8L)
    (".webp", [], 4, np.uint8),  # with alpha (VP8X)
    (".tif", [], 3, np.uint8),
    (".tif", [], 3, np.uint16),
    (".pgm", [], 1, np.uint8),
    (".ppm", [], 3, np.uint8),
    (".pbm", [], 1, np.uint8),
    (".pam", [], 3, np.uint8),
    (".pfm", [], 3, np.float32),
    (".sr", [], 3, np.uint8),
    (".hdr", [], 3, np.float32),
    (".jp2", [], 3, np.uint8),
    (".gif", [], 3, np.uint8),
    (".avif", [], 3, np.uint8),
]


@pytest.mark.parametrize("suffix,params,channels,dtype", FORMATS)
def test_header_sizes_match_decoded_images(tmp_path, suffix, params, channels, dtype):
    img = RNG.integers(0, 256, (37, 53, channels)).astype(dtype)
    path = tmp_path / f"x{suffix}"
    try:
        written = cv2.imwrite(str(path), img[..., 0] if channels == 1 else img, params)
    except cv2.error:
        written = False
    if not written:
        pytest.skip(f"this OpenCV cannot write {suffix}")
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image_file_size(path) == (decoded.shape[1], decoded.shape[0]) == (53, 37)


def test_header_sizes_of_the_shared_images(shared):
    for path in sorted((shared / "data" / "images").glob("*.jpg")):
        h, w = cv2.imread(str(path)).shape[:2]
        assert image_file_size(path) == (w, h), path


def test_unknown_and_damaged_headers_give_no_size(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00")  # cut inside a segment
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for name in ("a.txt", "b.jpg", "c.png"):
        assert image_file_size(tmp_path / name) is None


def test_pixel_cap_files_arrays_env_and_context(tmp_path, monkeypatch):
    monkeypatch.delenv("RETINAFACE_MAX_PIXELS", raising=False)
    path = tmp_path / "p.png"
    cv2.imwrite(str(path), BGR)  # 30x20 = 600 pixels
    msg = r"p.png: 30x20 image \(600 pixels\) is larger than the limit of 599 pixels"
    with pytest.raises(ImageError, match=msg):
        load_image(path, max_pixels=599)
    with pytest.raises(ImageError, match="image array: 30x20 .* limit of 599"):
        load_image(BGR, max_pixels=599)
    assert load_image(path, max_pixels=600).shape == (20, 30, 3)
    assert load_image(BGR, max_pixels=0) is not None  # 0: no cap
    monkeypatch.setenv("RETINAFACE_MAX_PIXELS", "599")
    with pytest.raises(ImageError, match="limit of 599"):
        load_image(BGR)
    with max_pixels_limit(600):  # the CLI's --max-pixels: also for calls without max_pixels=
        assert load_image(path).shape == (20, 30, 3)
    monkeypatch.setenv("RETINAFACE_MAX_PIXELS", "many")
    with pytest.raises(ValueError, match="RETINAFACE_MAX_PIXELS"):
        load_image(BGR)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(BGR, max_pixels=-1)


def test_default_cap_refuses_a_huge_header_before_decoding(tmp_path, monkeypatch):
    """A 100-byte PNG claiming 60000x60000: refused from its header (imdecode never runs)."""
    from test_detect_cli_hostile import png_claiming

    monkeypatch.delenv("RETINAFACE_MAX_PIXELS", raising=False)
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded"))
    (tmp_path / "huge.png").write_bytes(png_claiming(60000, 60000))
    with pytest.raises(ImageError, match="huge.png: 60000x60000 .* limit of 100,000,000"):
        load_image(tmp_path / "huge.png")


def test_opencv_errors_and_unreadable_files_become_image_errors(tmp_path):
    from test_detect_cli_hostile import png_claiming

    (tmp_path / "huge.png").write_bytes(png_claiming(60000, 60000))
    with pytest.raises(ImageError, match="huge.png: .*OpenCV's pixel limit"):
        load_image(tmp_path / "huge.png", max_pixels=0)  # our cap off: OpenCV's cv2.error
    (tmp_path / "mem.jpg").symlink_to("/proc/self/mem")  # reading it fails with EIO
    with pytest.raises(ImageError, match="mem.jpg: cannot read the file"):
        load_image(tmp_path / "mem.jpg")
    (tmp_path / "dir.jpg").mkdir()
    with pytest.raises(ImageError, match="dir.jpg: not a regular file"):
        load_image(tmp_path / "dir.jpg")


def test_resize_rules():
    assert resize_factor(480, 640) == 1.0
    # test_widerface.py: short side -> 1600 unless the long side would exceed 2150
    assert resize_factor(600, 800, 1600, 2150) == pytest.approx(1600 / 600)
    assert resize_factor(768, 1024, 1600, 2150) == pytest.approx(1600 / 768)
    assert resize_factor(600, 1100, 1600, 2150) == pytest.approx(2150 / 1100)
    assert resize_factor(480, 640, max_size=1280) == pytest.approx(2.0)
    assert resize_factor(480, 640, target_size=240) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="max_size"):
        resize_factor(10, 10, max_size=0)


def test_network_input_resizes_float_and_subtracts_mean():
    x = to_network_input(BGR, 1.0, (104, 117, 123))
    np.testing.assert_array_equal(x, BGR.astype(np.float32) - np.float32([104, 117, 123]))
    y = to_network_input(BGR, 2.0, (0, 0, 0))
    ref = cv2.resize(
        BGR.astype(np.float32), None, None, fx=2.0, fy=2.0, interpolation=cv2.INTER_LINEAR
    )
    np.testing.assert_array_equal(y, ref)
    assert y.shape == (40, 60, 3)


def test_face_to_dict_json_roundtrip():
    row = np.arange(15, dtype=np.float32)
    f = Face.from_row(row)
    d = json.loads(json.dumps(f.to_dict()))
    assert d["box"] == [0, 1, 2, 3] and d["score"] == 4.0
    assert d["landmarks"] == [[5, 6], [7, 8], [9, 10], [11, 12], [13, 14]]
    np.testing.assert_array_equal(f.to_row(), row)
    assert f.landmarks.shape == (5, 2)


def test_faces_from_rows_equal_from_row_and_do_not_alias_the_input():
    rows = np.random.default_rng(0).uniform(0, 100, (7, 15)).astype(np.float32)
    faces = Face.from_rows(rows)
    assert len(faces) == 7
    for f, row in zip(faces, rows, strict=True):
        g = Face.from_row(row)
        np.testing.assert_array_equal(f.to_row(), g.to_row())
        assert type(f.score) is float and f.score == g.score
        assert f.box.shape == (4,) and f.landmarks.shape == (5, 2)
    rows[:] = -1  # the caller's array is not shared with the faces
    assert faces[0].box.min() >= 0 and faces[-1].landmarks.min() >= 0
    assert Face.from_rows(np.zeros((0, 15), np.float32)) == []
