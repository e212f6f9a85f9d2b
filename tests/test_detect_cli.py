"""The detect.py CLI, run in-process: images, folders, bad files, videos, JSON, crops."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
from test_detect_helpers import fake_detector

from retinaface_jax.inference.cli import main


@pytest.fixture(scope="module")
def det():
    return fake_detector(batch_size=4)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(d / "a.jpg"), rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    cv2.imwrite(str(d / "sub" / "b.png"), rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "notes.png").write_text("hello")
    return d


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_images_dirs_and_bad_files(det, photos, tmp_path, capsys):
    out, js = tmp_path / "out", tmp_path / "faces.jsonl"
    code = main(
        [
            str(photos),
            str(tmp_path / "missing.jpg"),
            "--output",
            str(out),
            "--json",
            str(js),
            "--quiet",
        ],
        detector=det,
    )
    assert code == 1
    err = capsys.readouterr().err
    for name in ("broken.jpg", "notes.png", "missing.jpg"):
        assert name in err
    assert (out / "a.jpg").is_file() and (out / "sub" / "b.png").is_file()
    recs = _records(js)
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in recs) == ["a.jpg", "b.png"]
    for r in recs:
        for f in r["faces"]:
            assert len(f["box"]) == 4 and len(f["landmarks"]) == 5 and 0 <= f["score"] <= 1


def test_all_good_exit_zero_json_stdout(det, photos, tmp_path, capsys):
    code = main(
        [
            str(photos / "a.jpg"),
            "--output",
            str(tmp_path / "o"),
            "--json",
            "-",
            "--vis-threshold",
            "0.0",
        ],
        detector=det,
    )
    assert code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["image"].endswith("a.jpg")


def test_never_overwrites_inputs(det, photos, capsys):
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):  # --json pointing at an input is refused up front
        main([str(photos / "a.jpg"), "--json", str(photos / "a.jpg")], detector=det)
    code = main(
        [str(photos / "a.jpg"), str(photos / "sub" / "b.png"), "--output", str(photos), "--quiet"],
        detector=det,
    )
    assert code == 0
    for p, data in before.items():
        assert p.read_bytes() == data
    assert (photos / "a_det.jpg").is_file()
    capsys.readouterr()


def test_save_crops(det, photos, tmp_path):
    out = tmp_path / "o"
    assert (
        main(
            [
                str(photos / "a.jpg"),
                "--output",
                str(out),
                "--save-crops",
                "--vis-threshold",
                "0.5",
                "--quiet",
            ],
            detector=det,
        )
        == 0
    )
    crops = sorted((out / "crops").glob("a_face*.png"))
    faces = det.detect(photos / "a.jpg")
    assert len(crops) == sum(f.score >= 0.5 for f in faces) > 0
    assert cv2.imread(str(crops[0])).shape == (112, 112, 3)


def test_video(det, tmp_path):
    src = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(src), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 64))
    assert w.isOpened()
    rng = np.random.default_rng(1)
    for _ in range(5):
        w.write(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    w.release()
    out, js = tmp_path / "o", tmp_path / "v.jsonl"
    assert (
        main(
            [str(src), "--output", str(out), "--json", str(js), "--batch-size", "2", "--quiet"],
            detector=det,
        )
        == 0
    )
    recs = _records(js)
    assert [r["frame"] for r in recs] == [0, 1, 2, 3, 4]
    cap = cv2.VideoCapture(str(out / "clip.avi"))
    n = 0
    while cap.read()[0]:
        n += 1
    assert n == 5
    bad = tmp_path / "fake.mp4"
    bad.write_bytes(b"nope")
    assert main([str(bad), "--output", str(out), "--quiet"], detector=det) == 1


def test_real_weights_end_to_end(shared, tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv("RETINAFACE_CACHE", str(tmp_path / "cache"))
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)  # as in a fresh process
    # as in a fresh process: JAX opens its disk cache once per process and then ignores a new
    # dir, and an in-memory hit from an earlier test would skip the disk cache
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()
    jax.clear_caches()
    img = tmp_path / "curve.jpg"
    shutil.copy(shared / "data" / "images" / "biubug6_curve_test.jpg", img)
    weights = shared / "data" / "weights" / "mobilenet0.25_Final.pth"
    js = tmp_path / "f.jsonl"
    code = main(
        [
            str(img),
            "--weights",
            str(weights),
            "--output",
            str(tmp_path / "o"),
            "--json",
            str(js),
            "--quiet",
        ]
    )
    cache_dir = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", previous)
    compilation_cache.reset_cache()  # later tests reopen the previous dir
    assert code == 0
    assert cache_dir == str(tmp_path / "cache" / "jax_cache")
    assert any((tmp_path / "cache" / "jax_cache").iterdir())  # compiled programs persisted
    faces = _records(js)[0]["faces"]
    assert len(faces) > 50 and faces[0]["score"] > 0.99
    assert (tmp_path / "o" / "curve.jpg").is_file()
