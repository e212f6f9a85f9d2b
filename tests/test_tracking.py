"""``FaceTracker``: ids across frames on synthetic detections (misses, new faces, low scores,
crossings), and on a synthetic video of moving real faces run through the official detector."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import retinaface_jax
from retinaface_jax import Face, FaceTracker
from retinaface_jax.inference import tracking
from retinaface_jax.inference.tracking import _associate

WEIGHTS = "data/weights/mobilenet0.25_Final.pth"
IMAGE = "data/images/biubug6_curve_test.jpg"


def _face(box, score=0.95) -> Face:
    return Face(np.asarray(box, np.float32), score, np.zeros((5, 2), np.float32))


def _square(cx, cy, size=40, score=0.95) -> Face:
    h = size / 2
    return _face((cx - h, cy - h, cx + h, cy + h), score)


def _ids(tracked) -> list[int]:
    return [f.track_id for f in tracked]


# -- Face.track_id ------------------------------------------------------------------------------
def test_face_track_id_field():
    rows = np.arange(30, dtype=np.float32).reshape(2, 15)
    faces = Face.from_rows(rows)
    assert all(f.track_id is None for f in faces)
    assert "id" not in faces[0].to_dict()
    tracked = faces[0].with_track_id(7)
    assert tracked.track_id == 7 and tracked.to_dict()["id"] == 7
    assert tracked.box is faces[0].box and faces[0].track_id is None  # a copy, arrays shared
    assert set(tracked.to_dict()) == {"box", "score", "landmarks", "id"}
    assert np.array_equal(tracked.to_row(), faces[0].to_row())
    assert "track_id=7" in repr(tracked)
    assert Face(np.zeros(4), 0.5, np.zeros((5, 2)), 3).track_id == 3
    assert retinaface_jax.FaceTracker is FaceTracker


# -- unit tests on synthetic detections --------------------------------------------------------
def test_ids_persist_for_moving_faces_and_input_is_not_modified():
    tracker = FaceTracker()
    seen = []
    for t in range(20):
        faces = [_square(50 + 5 * t, 60), _square(200 - 4 * t, 150 + 2 * t, 50)]
        out = tracker.update(faces)
        assert all(f.track_id is None for f in faces)
        assert [f.box.tolist() for f in out] == [f.box.tolist() for f in faces]  # input order
        seen.append(_ids(out))
    assert seen == [[1, 2]] * 20


def test_missed_frames_keep_the_id_until_max_lost():
    tracker = FaceTracker(max_lost=5)
    for t in range(10):
        assert _ids(tracker.update([_square(50 + 6 * t, 80)])) == [1]
    for _ in range(5):  # missed for max_lost frames: kept, predicted along its motion
        assert tracker.update([]) == []
    assert _ids(tracker.update([_square(50 + 6 * 15, 80)])) == [1]  # found where predicted
    for _ in range(6):  # now one frame more than max_lost: dropped
        tracker.update([])
    assert tracker.active_tracks == 0
    assert _ids(tracker.update([_square(50 + 6 * 22, 80)])) == [2]


def test_face_leaving_and_a_new_one_appearing_gets_a_new_id():
    tracker = FaceTracker()
    for t in range(8):
        assert _ids(tracker.update([_square(100, 100 + 3 * t)])) == [1]
    for t in range(8):  # the first face has gone; another appears elsewhere
        assert _ids(tracker.update([_square(250, 40 + 3 * t)])) == [2]
    # and one appearing at the same time as a tracked face gets the next id
    out = tracker.update([_square(250, 64), _square(60, 200)])
    assert _ids(out) == [2, 3]


def test_low_score_detections_continue_tracks_but_do_not_start_or_revive_them():
    tracker = FaceTracker(high_threshold=0.6, low_threshold=0.1)
    for t in range(5):
        tracker.update([_square(80 + 4 * t, 100)])
    for t in range(5, 9):  # the face scores low (e.g. turned away): same id, reported
        out = tracker.update([_square(80 + 4 * t, 100, score=0.3)])
        assert _ids(out) == [1] and out[0].score == pytest.approx(0.3)
    # a new low-score detection alone starts nothing; one below low_threshold is ignored
    out = tracker.update([_square(80 + 4 * 9, 100), _square(250, 200, score=0.4)])
    assert _ids(out) == [1]
    assert _ids(tracker.update([_square(80 + 4 * 10, 100, score=0.05)])) == []
    # the track is now lost (missed one frame): low-score boxes do not revive it ...
    assert _ids(tracker.update([_square(80 + 4 * 11, 100, score=0.3)])) == []
    # ... a confident one does
    assert _ids(tracker.update([_square(80 + 4 * 12, 100)])) == [1]
    assert tracker.active_tracks == 1


def test_crossing_faces_with_occlusion_keep_their_ids():
    """Two faces on one line crossing; the front one hides the other for three frames. Matching
    against the last boxes (no motion model) hands the hidden face's id to the wrong face."""

    def run():
        tracker = FaceTracker()
        ids = {"a": set(), "b": set()}
        for t in range(30):
            a, b = _square(40 + 8 * t, 100), _square(280 - 8 * t, 104)
            hidden = abs(a.box[0] - b.box[0]) < 30  # b is in front
            faces = [b] if hidden else [a, b]
            out = tracker.update(faces)
            for name, face in (("a", a), ("b", b)):
                for f in out:
                    if f.box.tolist() == face.box.tolist():
                        ids[name].add(f.track_id)
        return ids

    assert run() == {"a": {1}, "b": {2}}
    with pytest.MonkeyPatch.context() as mp:  # the test can fail: no motion prediction
        mp.setattr(tracking._Track, "predicted", _last_box)
        assert run() != {"a": {1}, "b": {2}}


def _last_box(track, frame):
    cx, cy, w, h = track.states[-1]
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_assignment_is_optimal_not_greedy():
    # track 0 overlaps both detections best with detection 0, but track 1 only with detection 0:
    # greedy takes (0, 0) and leaves track 1 unmatched; the optimum matches both
    tracks = np.array([[0, 0, 40, 40], [20, 0, 60, 40]], float)
    dets = np.array([[10, 0, 50, 40], [-10, 0, 30, 40]], float)
    pairs, lost_tracks, new_dets = _associate(tracks, dets, 0.3)
    assert sorted(pairs) == [(0, 1), (1, 0)]
    assert len(lost_tracks) == 0 and len(new_dets) == 0
    # below the threshold nothing is matched
    pairs, lost_tracks, new_dets = _associate(tracks, dets + 100, 0.3)
    assert pairs == [] and lost_tracks.tolist() == [0, 1] and new_dets.tolist() == [0, 1]


def test_min_hits_suppresses_one_frame_false_positives():
    tracker = FaceTracker(min_hits=2)
    assert _ids(tracker.update([_square(100, 100)])) == []  # not yet confirmed
    out = tracker.update([_square(102, 100), _square(250, 50)])  # 2nd: one-frame blip
    assert _ids(out) == [1]
    assert _ids(tracker.update([_square(104, 100)])) == [1]
    assert tracker.active_tracks == 1  # the blip's tentative track is gone, its id never given
    tracker.update([_square(104, 100), _square(30, 200)])
    assert _ids(tracker.update([_square(104, 100), _square(30, 200)])) == [1, 2]


def test_reset_and_validation():
    tracker = FaceTracker()
    tracker.update([_square(50, 50)])
    tracker.reset()
    assert tracker.active_tracks == 0
    assert _ids(tracker.update([_square(50, 50)])) == [2]  # ids are never reused
    assert tracker.update([]) == [] and tracker.update(()) == []
    degenerate = tracker.update([_face((5, 5, 5, 5)), _face((np.nan, 0, 1, 1))])
    assert len(degenerate) == 2  # no crash; empty boxes just never match a track
    for kwargs in (
        {"high_threshold": 1.5},
        {"low_threshold": -0.1},
        {"low_threshold": 0.7, "high_threshold": 0.6},
        {"iou_threshold": float("nan")},
        {"max_lost": -1},
        {"max_lost": 2.5},
        {"min_hits": 0},
        {"motion_window": 1},
        {"motion_window": True},
    ):
        with pytest.raises(ValueError):
            FaceTracker(**kwargs)


# -- a synthetic video of real faces through the official detector -----------------------------
W, H, FRAMES = 320, 240, 40
SCALE = 0.6  # crops of faces ~35 x 43 pixels


def _video(shared):
    """Frames of three face crops moving along straight lines over a textured background: A and
    B cross diagonally (B in front, hiding A for a few frames), C moves down on the right.
    Returns the frames and, per face, its true face box and visible fraction in each frame."""
    src = cv2.imread(str(shared / IMAGE))
    # three clear faces of the source image (official detector boxes), cropped with a margin
    boxes = {"a": (143.7, 323.6, 202.7, 395.1), "b": (596.8, 214.2, 655.7, 295.2)}
    boxes["c"] = (520.6, 347.7, 576.5, 412.7)
    crops, inner = {}, {}
    for name, (x1, y1, x2, y2) in boxes.items():
        mx, my = 0.3 * (x2 - x1), 0.25 * (y2 - y1)
        cx1, cy1, cx2, cy2 = (round(v) for v in (x1 - mx, y1 - my, x2 + mx, y2 + my))
        crops[name] = cv2.resize(src[cy1:cy2, cx1:cx2], None, fx=SCALE, fy=SCALE)
        inner[name] = SCALE * np.array([x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1])
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:H, 0:W]
    background = np.stack([60 + 0.3 * xx, 90 + 0.2 * yy, 110 + 0.1 * (xx + yy)], -1)
    background = np.clip(background + rng.normal(0, 6, (H, W, 3)), 0, 255).astype(np.uint8)
    paths = {"a": ((5, 5), (190, 150)), "b": ((5, 150), (190, 5)), "c": ((245, 0), (245, 150))}
    order = ("c", "a", "b")  # b is pasted last: in front of a where they cross
    frames, truth = [], {name: [] for name in order}
    visible = {name: [] for name in order}
    for t in range(FRAMES):
        frame, owner = background.copy(), np.full((H, W), -1)
        s = t / (FRAMES - 1)
        for k, name in enumerate(order):
            (x0, y0), (x1, y1) = paths[name]
            x, y = round(x0 + s * (x1 - x0)), round(y0 + s * (y1 - y0))
            crop = crops[name]
            h, w = crop.shape[:2]
            frame[y : y + h, x : x + w] = crop[: H - y, : W - x]
            owner[y : y + h, x : x + w] = k
            truth[name].append(inner[name] + [x, y, x, y])
        for k, name in enumerate(order):
            x1, y1, x2, y2 = np.round(truth[name][-1]).astype(int)
            visible[name].append(float(np.mean(owner[y1:y2, x1:x2] == k)))
        frames.append(frame)
    return frames, truth, visible


def _iou(a, b) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = np.prod(np.clip(rb - lt, 0, None))
    return inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)


@pytest.fixture(scope="module")
def detections(shared):
    """The official detector's faces in each frame of the synthetic video, and the truth."""
    from retinaface_jax import Detector
    from retinaface_jax.weights.load import load_model

    frames, truth, visible = _video(shared)
    detector = Detector(load_model(shared / WEIGHTS))
    return [detector.detect(f) for f in frames], truth, visible


def _track_video(detections, truth, visible, tracker):
    """Per true face, the id of the tracked face on it in each frame (None where none was), and
    the confident tracked faces on no true face. A tracked face is on the true face, among those
    at least half visible, whose box it overlaps most (IoU >= 0.5)."""
    ids = {name: [None] * len(detections) for name in truth}
    stray = []
    for t, faces in enumerate(detections):
        for f in tracker.update(faces):
            shown = [n for n in truth if visible[n][t] >= 0.5]
            ious = [_iou(f.box, truth[n][t]) for n in shown]
            if ious and max(ious) >= 0.5:
                name = shown[int(np.argmax(ious))]
                assert ids[name][t] is None, (t, name)  # one tracked face per true face
                ids[name][t] = f.track_id
            elif f.score >= 0.6:
                stray.append((t, f))
    return ids, stray


def test_video_ids_persist_and_do_not_swap_at_the_crossing(detections):
    faces, truth, visible = detections
    # the crossing really hides a for a while (else this test would check nothing)
    hidden = [t for t, v in enumerate(visible["a"]) if v < 0.3]
    assert len(hidden) >= 5 and 0 < hidden[0] and hidden[-1] < FRAMES - 5, visible["a"]
    ids, stray = _track_video(faces, truth, visible, FaceTracker())
    for name, per_frame in ids.items():
        shown = [i for i, v in zip(per_frame, visible[name], strict=True) if v >= 0.8]
        assert shown.count(None) <= 2, (name, per_frame)  # found where visible
        found = [i for i in per_frame if i is not None]
        assert len(set(found)) == 1, (name, per_frame)  # one id all along
    assert len({ids[n][0] for n in ids}) == 3 and ids["a"][-1] == ids["a"][0]
    assert not stray, stray
    # without the motion prediction a comes back with a new id after the crossing
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking._Track, "predicted", _last_box)
        ids, _ = _track_video(faces, truth, visible, FaceTracker())
        assert len({i for i in ids["a"] if i is not None}) > 1, ids["a"]
