"""``Detector(rotations=...)`` (``inference.rotations``): exact mapping back for every quarter
turn, the numpy NMS against the jitted one, validation, the default path unchanged, and rotated
shared images recovering the upright detections (official weights)."""

from __future__ import annotations

import cv2
import jax.numpy as jnp
import numpy as np
import pytest

import retinaface_jax
from retinaface_jax.inference import postprocess
from retinaface_jax.inference.rotations import (
    greedy_nms,
    map_rows_back,
    merge_rotations,
    rotate_image,
    validate_rotations,
)

WEIGHTS = "data/weights/mobilenet0.25_Final.pth"
ALL = (0, 90, 180, 270)


def _marked(height: int, width: int, seed: int):
    """An image ``[h, w, 2]``: channel 0 marks a rectangle, channel 1 five single landmark pixels
    (1..5); and the row ``[x1, y1, x2, y2, score, 5 x (x, y)]`` describing them (continuous
    coordinates: pixel ``(col, row)`` spans ``[col, col + 1)``, its centre is ``col + 0.5``)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 2), np.int32)
    x1, x2 = sorted(rng.choice(width + 1, 2, replace=False))
    y1, y2 = sorted(rng.choice(height + 1, 2, replace=False))
    img[y1:y2, x1:x2, 0] = 1
    lm = []
    for v, f in enumerate(rng.choice(height * width, 5, replace=False), start=1):
        r, c = divmod(int(f), width)
        img[r, c, 1] = v
        lm += [c + 0.5, r + 0.5]
    return img, np.array([[x1, y1, x2, y2, 0.9, *lm]], np.float32)


def _describe(img: np.ndarray) -> np.ndarray:
    """:func:`_marked`'s row, read off a (turned) marked image."""
    r, c = np.nonzero(img[..., 0])
    lm = []
    for v in range(1, 6):
        (rv,), (cv,) = np.nonzero(img[..., 1] == v)
        lm += [cv + 0.5, rv + 0.5]
    return np.array([[c.min(), r.min(), c.max() + 1, r.max() + 1, 0.9, *lm]], np.float32)


@pytest.mark.parametrize("size", [(37, 53), (41, 29), (1, 7), (64, 64)])
@pytest.mark.parametrize("angle", ALL)
def test_rows_map_back_exactly(size, angle):
    """A box and five landmarks drawn into an odd-sized image, the image turned by
    ``rotate_image``, the turned marks read off: mapped back they are the originals exactly, in
    the same landmark order."""
    h, w = size
    for seed in range(20):
        img, row = _marked(h, w, seed)
        np.testing.assert_array_equal(_describe(img), row)
        turned = rotate_image(img, angle)
        assert turned.shape[:2] == ((h, w) if angle % 180 == 0 else (w, h))
        seen = _describe(turned)
        if angle:
            assert not np.array_equal(seen, row)  # the marks did move
        np.testing.assert_array_equal(map_rows_back(seen, angle, h, w), row)


def test_merge_rotations_uses_the_resized_extent():
    """Copies of a resized image turn about the resized extent: ``shape / resize`` in input
    pixels; several copies of one face merge into its best-scoring row."""
    img, row = _marked(30, 50, 3)  # the "resized" image: 30 x 50 at resize 0.5
    copies, angles = [], (0, 90, 180, 270)
    for i, a in enumerate(angles):
        seen = _describe(rotate_image(img, a))
        seen[:, :4] /= 0.5
        seen[:, 5:] /= 0.5
        seen[:, 4] = 0.5 + 0.1 * i
        copies.append(seen)
    merged = merge_rotations(copies, angles, (30, 50), 0.5, 0.4, None)
    want = row.copy()
    want[:, :4] *= 2
    want[:, 5:] *= 2
    want[:, 4] = np.float32(0.8)
    np.testing.assert_array_equal(merged, want)


def test_numpy_nms_matches_the_jitted_one():
    """The host merge NMS keeps what the detector's own (original-arithmetic) NMS keeps."""
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 300
        xy = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        wh = rng.uniform(1, 60, (n, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = np.sort(rng.uniform(0.02, 1, n).astype(np.float32))[::-1].copy()
        rows = np.zeros((n, 15), np.float32)
        rows[:, :4], rows[:, 4] = boxes, scores
        for thr in (0.3, 0.4, 0.7):
            keep, count = postprocess.greedy_nms(
                jnp.asarray(scores), jnp.asarray(boxes), jnp.float32(thr), n
            )
            want = np.asarray(keep)[: int(count)]
            np.testing.assert_array_equal(greedy_nms(rows, thr), want, err_msg=f"{trial} {thr}")
    # IoU exactly at the threshold survives (+1 areas: 10x10 inside 10x20 is IoU 0.5); a tie in
    # score keeps the earlier row first
    rows = np.zeros((3, 15), np.float32)
    rows[:, :5] = [[0, 0, 9, 19, 0.9], [0, 0, 9, 9, 0.9], [0, 0, 9, 10, 0.8]]
    np.testing.assert_array_equal(greedy_nms(rows, 0.5), [0, 1])
    np.testing.assert_array_equal(greedy_nms(rows, 0.499), [0])


def test_validation():
    assert validate_rotations(None) is None
    assert validate_rotations((0,)) is None
    assert validate_rotations([360]) is None
    assert validate_rotations((0, -90, 180, 450)) == (0, 270, 180, 90)
    assert validate_rotations(np.array([90, 180]).tolist()) == (90, 180)
    bad = {
        (45,): "multiples of 90",
        (0, 90, 90): "twice",
        (0, 360): "twice",
        (): "at least one",
        "0,90": "sequence",
        90: "sequence",
        (90.0,): "integer",
        (True,): "integer",
    }
    for value, words in bad.items():
        with pytest.raises(ValueError, match=f"^rotations: .*{words}"):
            validate_rotations(value)


def test_cli_flag(capsys):
    """``detect.py --rotations``: comma-separated angles, usage error (exit 2) naming the field."""
    from retinaface_jax.inference.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["x.jpg"]).rotations is None
    assert parser.parse_args(["x.jpg", "--rotations", "0,90,180,270"]).rotations == ALL
    assert parser.parse_args(["x.jpg", "--rotations", "0"]).rotations is None
    for bad, words in (("0,45", "multiples of 90"), ("0,a", "integers"), ("90,90", "twice")):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["x.jpg", "--rotations", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--rotations" in err and words in err, err


@pytest.fixture(scope="module")
def model(shared):
    return retinaface_jax.load_model(shared / WEIGHTS)


@pytest.fixture(scope="module")
def plain(model):
    return retinaface_jax.Detector(model, compilation_cache=False)


@pytest.fixture(scope="module")
def rotating(model):
    return retinaface_jax.Detector(model, compilation_cache=False, rotations=ALL)


def test_detector_rejects_bad_rotations(model):
    with pytest.raises(ValueError, match="^rotations: "):
        retinaface_jax.Detector(model, compilation_cache=False, rotations=(0, 100))


def _rows(faces) -> np.ndarray:
    return np.array([[*f.box, f.score, *f.landmarks.ravel()] for f in faces], np.float32).reshape(
        -1, 15
    )


def test_zero_rotation_is_the_default_path(model, plain, shared):
    """``rotations=(0,)`` is no rotation at all: the same detections, bit for bit."""
    only_zero = retinaface_jax.Detector(model, compilation_cache=False, rotations=(0,))
    assert only_zero.rotations is None
    img = cv2.imread(str(shared / "data/images/biubug6_curve_test.jpg"))
    np.testing.assert_array_equal(_rows(only_zero.detect(img)), _rows(plain.detect(img)))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Plain (continuous) IoU of boxes ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def test_rotated_images_recover_the_upright_faces(plain, rotating, shared, capsys):
    """Shared photos turned by 90, 180 and 270 degrees: with ``rotations=(0, 90, 180, 270)`` the
    faces found upright (score >= 0.6) are found again (IoU >= 0.5 once mapped to the upright
    frame, landmarks in the same order), far more of them than without."""
    vis = plain.cfg.vis_threshold
    report = []
    for path in sorted((shared / "data/images").glob("*.jpg")):
        img = cv2.imread(str(path))
        h, w = img.shape[:2]
        upright = _rows([f for f in plain.detect(img) if f.score >= vis])
        assert len(upright), path.name
        for angle in (90, 180, 270):
            turned = np.ascontiguousarray(rotate_image(img, angle))
            found = {}
            for name, det in (("without", plain), ("with", rotating)):
                rows = _rows([f for f in det.detect(turned) if f.score >= vis])
                back = map_rows_back(rows, angle, h, w)  # the turned image's rows, upright
                iou = (
                    _iou(upright[:, :4], back[:, :4]) if len(back) else np.zeros((len(upright), 0))
                )
                hit = iou.max(axis=1, initial=0.0) >= 0.5
                found[name] = hit.mean()
                if name == "with":
                    match = back[iou.argmax(axis=1)][hit]
                    size = (upright[hit, 2] - upright[hit, 0])[:, None]
                    err = np.hypot(*(match[:, 5:] - upright[hit, 5:]).reshape(-1, 5, 2).T).T
                    # each landmark near the upright one of the same name (a mirrored order
                    # would put the eyes a face-width apart)
                    assert np.median(err / size) < 0.05, (path.name, angle)
            report.append((path.name, angle, len(upright), found["without"], found["with"]))
    with capsys.disabled():
        print(f"\nrecall of the upright faces (score >= {vis}, IoU >= 0.5): without / with")
        for name, angle, n, without, with_ in report:
            print(f"  {name:26s} {angle:3d}  {n:4d} faces  {without:.3f}  {with_:.3f}")
    faces = np.array([n for _, _, n, _, _ in report])
    without = np.array([r[3] for r in report]) @ faces / faces.sum()
    with_ = np.array([r[4] for r in report]) @ faces / faces.sum()
    assert min(r[4] for r in report) >= 0.9, report
    assert with_ >= 0.97 and with_ >= 2 * without, (without, with_)
