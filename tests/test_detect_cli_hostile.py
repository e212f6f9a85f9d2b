"""detect.py against hostile inputs: every bad input is named, skipped, and the rest is processed;
user errors are one line on stderr (a traceback only with --debug)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_detect_helpers import fake_detector

from retinaface_jax import image_header
from retinaface_jax.inference.cli import main

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def det():
    return fake_detector(batch_size=4)


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("RETINAFACE_DEBUG", raising=False)
    monkeypatch.delenv("RETINAFACE_MAX_PIXELS", raising=False)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width x height`` (no real pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _image(path: Path, h: int = 40, w: int = 50) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(
        ".png" if path.suffix in (".exr", ".pgm") else path.suffix, _pixels(h, w)
    )
    assert ok
    buf.tofile(str(path))
    return path


def _pixels(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(det, argv, capsys):
    code = main([*map(str, argv), "--quiet"], detector=det)
    return code, capsys.readouterr().err


def test_every_bad_input_is_named_skipped_and_the_rest_processed(det, tmp_path, capsys):
    src, out, js = tmp_path / "in", tmp_path / "out", tmp_path / "f.jsonl"
    good = [_image(src / "a.jpg"), _image(src / "sub" / "b.png"), _image(src / "z.jpg")]
    (src / "huge.png").write_bytes(png_claiming(60000, 60000))  # 3.6 gigapixels
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (src / "mem.jpg").symlink_to("/proc/self/mem")  # a regular file whose read fails (EIO)
    os.mkfifo(tmp_path / "pipe.png")  # named like an image, would block a naive reader
    exr = _image(src / "hdr.exr")  # decodes (PNG data) but cannot be written back as .exr
    (out / "sub").mkdir(parents=True)
    blocker = _image(src / "deep" / "c.png")
    (out / "deep").write_text("a file where the output directory should be")
    code, err = _run(
        det,
        [src, tmp_path / "pipe.png", "--output", out, "--json", js, "--batch-size", "3"],
        capsys,
    )
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    expect = {
        "huge.png": "60000x60000",
        "broken.jpg": "decode",
        "mem.jpg": "cannot read",
        "pipe.png": "not a regular file",
        "c.png": "cannot write",
    }
    for name, what in expect.items():
        assert any(name in line and what in line for line in lines), (name, err)
    assert len(lines) == len(expect), err
    assert "Traceback" not in err
    for g in good:
        assert (out / g.relative_to(src)).is_file()
    assert (out / "hdr.png").is_file() and not (out / "hdr.exr").exists()  # PNG fallback
    names = sorted(Path(r["image"]).name for r in _records(js))
    assert names == sorted([g.name for g in good] + [exr.name, blocker.name])
    assert "4 input(s) processed" in err and "5 failed" in err


def test_opencv_pixel_limit_is_reported_not_raised(det, tmp_path, capsys):
    """With our cap off (0), OpenCV's own limit (cv2.error) still only skips the input."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_claiming(60000, 60000))
    good = _image(tmp_path / "ok.jpg")
    code, err = _run(det, [huge, good, "--max-pixels", "0", "--output", tmp_path / "o"], capsys)
    assert code == 1
    assert "huge.png" in err and "pixel limit" in err and "Traceback" not in err
    assert (tmp_path / "o" / "ok.jpg").is_file()


def test_unreadable_file_permission_error(det, tmp_path, capsys, monkeypatch):
    """Tests run as root (chmod 000 does not stop root): the open() itself is made to refuse."""
    locked, good = _image(tmp_path / "locked.jpg"), _image(tmp_path / "ok.jpg")
    real_open = open

    def guarded_open(path, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(image_header, "open", guarded_open, raising=False)
    code, err = _run(det, [locked, good, "--output", tmp_path / "o"], capsys)
    assert code == 1
    assert "locked.jpg: cannot read the file (Permission denied)" in err
    assert (tmp_path / "o" / "ok.jpg").is_file()


def test_pixel_cap_flag_and_env(det, tmp_path, capsys, monkeypatch):
    small, big = _image(tmp_path / "small.png", 20, 20), _image(tmp_path / "big.png", 40, 50)
    code, err = _run(det, [small, big, "--max-pixels", "1000", "--output", tmp_path / "o"], capsys)
    assert code == 1
    assert "big.png: 50x40 image (2,000 pixels) is larger than the limit of 1,000 pixels" in err
    assert (tmp_path / "o" / "small.png").is_file() and not (tmp_path / "o" / "big.png").exists()
    monkeypatch.setenv("RETINAFACE_MAX_PIXELS", "1000")
    assert _run(det, [big, "--output", tmp_path / "o2"], capsys)[0] == 1
    # a raised cap reaches the detector's own load_image too (arrays it is given are re-checked)
    monkeypatch.setenv("RETINAFACE_MAX_PIXELS", "10")
    assert _run(det, [big, "--max-pixels", "5000", "--output", tmp_path / "o3"], capsys)[0] == 0
    monkeypatch.setenv("RETINAFACE_MAX_PIXELS", "lots")
    with pytest.raises(SystemExit) as e:
        main([str(big)], detector=det)
    assert e.value.code == 2 and "RETINAFACE_MAX_PIXELS" in capsys.readouterr().err


def test_oversized_file_is_refused_before_decoding(det, tmp_path, capsys, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image over the cap")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    for name in ("big.png", "big.jpg", "big.bmp", "big.webp", "big.tif"):
        _image(tmp_path / name, 40, 50)
    code, err = _run(det, [tmp_path, "--max-pixels", "1999", "--output", tmp_path / "o"], capsys)
    assert code == 1 and err.count("larger than the limit of 1,999 pixels") == 5


def test_a_failing_detection_skips_only_its_image(det, tmp_path, capsys):
    """If a batch fails (e.g. out of memory on one image), its images are retried one by one."""

    class Flaky:
        cfg = det.cfg

        def detect_batch(self, images, **kw):
            if any(img.shape[1] == 77 for img in images):
                raise MemoryError
            return det.detect_batch(images, **kw)

    imgs = [_image(tmp_path / "a.jpg"), _image(tmp_path / "wide.jpg", 40, 77)]
    imgs.append(_image(tmp_path / "c.jpg"))
    js = tmp_path / "f.jsonl"
    code = main(
        [*map(str, imgs), "--output", str(tmp_path / "o"), "--json", str(js), "--quiet"],
        detector=Flaky(),
    )
    err = capsys.readouterr().err
    assert code == 1 and "wide.jpg: detection failed: MemoryError" in err
    assert sorted(Path(r["image"]).name for r in _records(js)) == ["a.jpg", "c.jpg"]


def test_input_never_overwritten_after_extension_fallback(det, tmp_path, capsys):
    """``a/face.pgm`` is written as PNG (a 3-channel .pgm cannot be encoded): not onto b/face.png."""
    pgm, png = tmp_path / "a" / "face.pgm", _image(tmp_path / "b" / "face.png")
    pgm.parent.mkdir()
    assert cv2.imwrite(str(pgm), _pixels(30, 40)[:, :, 0])
    before = png.read_bytes(), pgm.read_bytes()
    code, err = _run(det, [pgm, png, "--output", tmp_path / "b"], capsys)
    assert code == 0, err
    assert (png.read_bytes(), pgm.read_bytes()) == before
    written = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert written == ["face.png", "face_det.png", "face_det2.png"]  # the input + two outputs


def test_output_never_overwrites_a_hard_link_to_an_input(det, tmp_path, capsys):
    src = _image(tmp_path / "in" / "x.png")
    (tmp_path / "out").mkdir()
    os.link(src, tmp_path / "out" / "x.png")
    before = src.read_bytes()
    assert _run(det, [src, "--output", tmp_path / "out"], capsys)[0] == 0
    assert src.read_bytes() == before and (tmp_path / "out" / "x_det.png").is_file()


def test_truncated_video_reports_frames_read_and_carries_on(det, tmp_path, capsys):
    clip = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(20):
        w.write(_pixels(48, 64))
    w.release()
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 2])
    good = _image(tmp_path / "ok.jpg")
    js = tmp_path / "f.jsonl"
    code, err = _run(det, [clip, good, "--output", tmp_path / "o", "--json", js], capsys)
    assert code == 1
    line = next(line for line in err.splitlines() if "clip.avi" in line)
    frames = [r["frame"] for r in _records(js) if r["image"].endswith("clip.avi")]
    assert 0 < len(frames) < 20 and frames == list(range(len(frames)))
    assert f"stopped after {len(frames)} of 20 frames" in line
    assert (tmp_path / "o" / "ok.jpg").is_file() and (tmp_path / "o" / "clip.avi").is_file()


# -- user errors: one line, no traceback unless --debug ------------------------------------------


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No cached weights and an unreachable download URL (nothing listens on port 9)."""
    monkeypatch.delenv("RETINAFACE_WEIGHTS", raising=False)
    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RETINAFACE_WEIGHTS_URL", "http://127.0.0.1:9/")
    return tmp_path / "cache"


def test_no_weights_offline_is_one_clear_line(offline, tmp_path, capsys):
    img = _image(tmp_path / "x.jpg")
    code = main([str(img), "--output", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for part in ("detect.py: error:", "detection_mobilenet0.25_Final.pth", "--weights PATH"):
        assert part in err
    assert str(offline) in err  # where the cache is


def test_bad_weights_file_is_one_line_and_debug_shows_traceback(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "model.pth"
    bad.write_bytes(b"this is not a checkpoint")
    img = _image(tmp_path / "x.jpg")
    argv = [str(img), "--weights", str(bad), "--output", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()  # e.g. "...: not a PyTorch checkpoint (...)"
    assert line.startswith(f"detect.py: error: {bad}: ")
    with pytest.raises(ValueError):  # --debug: the exception and its traceback propagate
        main([*argv, "--debug"])
    monkeypatch.setenv("RETINAFACE_DEBUG", "1")
    with pytest.raises(ValueError):
        main(argv)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top-k", "0"], "--top-k must be positive"),
        (["--max-size", "-5"], "--max-size must be positive"),
        (["--nms-threshold", "1.5"], "--nms-threshold must be between 0 and 1"),
        (["--max-pixels", "-1"], "--max-pixels must be >= 0"),
        (["--batch-size", "lots"], "invalid int value"),
    ],
)
def test_bad_flag_values_are_usage_errors(det, tmp_path, capsys, flags, message):
    img = _image(tmp_path / "x.jpg")
    with pytest.raises(SystemExit) as e:
        main([str(img), *flags], detector=det)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_missing_input_only_is_one_message_and_no_model_load(offline, tmp_path, capsys):
    code = main([str(tmp_path / "nope.jpg"), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "nope.jpg: no such file or directory" in err
    assert "download" not in err and not offline.exists()  # no weights were looked for


def test_end_to_end_subprocess_bad_input_among_good(shared, tmp_path):
    """The real ``python detect.py`` with real weights: the bad inputs are skipped, one line each."""
    good = tmp_path / "in" / "face.jpg"
    good.parent.mkdir()
    good.write_bytes((shared / "data" / "images" / "biubug6_curve_test.jpg").read_bytes())
    (tmp_path / "in" / "huge.png").write_bytes(png_claiming(60000, 60000))
    (tmp_path / "in" / "junk.jpg").write_bytes(b"junk")
    weights = shared / "data" / "weights" / "mobilenet0.25_Final.pth"
    env = {**os.environ, "RETINAFACE_CACHE": str(tmp_path / "cache")}
    env.pop("RETINAFACE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "detect.py"), str(tmp_path / "in"), "--weights", str(weights)]
        + ["--output", str(tmp_path / "o"), "--json", str(tmp_path / "f.jsonl"), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "huge.png: 60000x60000" in proc.stderr and "junk.jpg" in proc.stderr
    assert (tmp_path / "o" / "face.jpg").is_file()
    (record,) = _records(tmp_path / "f.jsonl")
    assert record["image"].endswith("face.jpg") and len(record["faces"]) > 50
