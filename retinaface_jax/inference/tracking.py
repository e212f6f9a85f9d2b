"""``FaceTracker``: identities for detected faces across video frames (ByteTrack-style).

Each frame's detections are associated with the tracks of the previous frames by the IoU between
a detection's box and the track's *predicted* box (a constant-velocity line fitted to the
track's recent boxes), in two stages as ByteTrack does: confident detections first, against every
track; then the low-score detections (often a face partly occluded, blurred or turned away), only
against the tracks still unmatched that were seen in the previous frame, so a track survives a
frame where its face scores low without low-score boxes reviving long-lost tracks. Unmatched
confident detections start new tracks; a track unmatched for more than ``max_lost`` frames is
dropped, and until then it can be found again at its predicted position (a face hidden for a few
frames keeps its id, and two faces crossing paths keep theirs because each prediction continues
along its own direction).

The assignment in each stage is an exact minimum-cost matching (Hungarian algorithm, costs
``1 - IoU``, each track or detection allowed to stay unmatched at the cost of the IoU threshold),
solved separately on each group of tracks and detections connected by an IoU above the threshold.
Greedy matching by highest IoU is simpler but can take the one box two tracks both overlap for
the wrong track and leave the other unmatched, which is what happens when faces cross; the
groups keep the exact solution cheap (almost every group in a frame is one track and one
detection). Written here with numpy only: no SciPy / ``lap`` dependency for one small solver.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from retinaface_jax.inference.face import Face


class _Track:
    """One tracked face: its recent matched boxes, the motion fitted to them, and bookkeeping."""

    __slots__ = ("frames", "states", "fit", "lost", "hits", "track_id")

    def __init__(self, frame: int, box: np.ndarray):
        self.frames: list[int] = []  # frame numbers of the recent matches
        self.states: list[list[float]] = []  # their boxes as (cx, cy, w, h)
        self.fit = (0.0, np.zeros(4), np.zeros(4))  # (mean frame, mean state, slope per frame)
        self.lost = 0  # frames since the last match
        self.hits = 0  # frames matched in total
        self.track_id: int | None = None  # given when the track is confirmed
        self.add(frame, box, 1)

    def add(self, frame: int, box: np.ndarray, window: int) -> None:
        """Record a match in ``frame`` (keeping the last ``window`` matches) and refit the motion:
        the least-squares line through the recent centres and sizes against the frame number
        (constant velocity; none while there is only one match)."""
        x1, y1, x2, y2 = (float(v) for v in box)
        self.frames.append(frame)
        self.states.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        del self.frames[:-window], self.states[:-window]
        self.lost = 0
        self.hits += 1
        states = np.array(self.states)
        t = np.array(self.frames, np.float64)
        t_mean, mean = float(t.mean()), states.mean(axis=0)
        dt = t - t_mean
        slope = dt @ (states - mean) / (dt @ dt) if len(t) > 1 else np.zeros(4)
        self.fit = (t_mean, mean, slope)

    def predicted(self, frame: int) -> np.ndarray:
        """The box expected in ``frame``: the fitted line evaluated there."""
        t_mean, mean, slope = self.fit
        cx, cy, w, h = (mean + slope * (frame - t_mean)).tolist()
        w, h = max(w, 1.0), max(h, 1.0)
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


class FaceTracker:
    """Gives each face a ``track_id`` that persists across the frames of a video.

    Call :meth:`update` once per frame, in order, with that frame's detections (e.g.
    ``Detector.detect``'s result; a frame without faces is an empty list). Parameters:

    - ``high_threshold`` (0.6, the default visualisation threshold): detections scoring at least
      this are matched first and start new tracks;
    - ``low_threshold`` (0.1): detections scoring in ``[low_threshold, high_threshold)`` only
      continue tracks matched in the previous frame; lower ones are ignored;
    - ``iou_threshold`` (0.3): least IoU between a confident detection and a track's predicted
      box to match them; ``low_iou_threshold`` (0.5): the same for low-score detections (stricter:
      they are less reliable);
    - ``max_lost`` (30): frames a track is kept without a match before it is dropped (its id is
      never reused);
    - ``min_hits`` (1): frames a new track must be matched in (consecutively, from its first)
      before it gets an id and is reported; 2 or more suppresses one-frame false positives at the
      cost of reporting a new face from its ``min_hits``-th frame;
    - ``motion_window`` (10): how many of a track's latest matches its constant-velocity motion
      is fitted to (least squares on box centre and size): a longer window averages out the
      detector's jitter of a pixel or two, which a two-frame velocity would extrapolate over
      every frame a face stays hidden; a shorter one follows accelerating faces sooner.

    Ids are consecutive ints from 1 in the order tracks are confirmed.
    """

    def __init__(
        self,
        *,
        high_threshold: float = 0.6,
        low_threshold: float = 0.1,
        iou_threshold: float = 0.3,
        low_iou_threshold: float = 0.5,
        max_lost: int = 30,
        min_hits: int = 1,
        motion_window: int = 10,
    ):
        for name, value in (
            ("high_threshold", high_threshold),
            ("low_threshold", low_threshold),
            ("iou_threshold", iou_threshold),
            ("low_iou_threshold", low_iou_threshold),
        ):
            if not (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and 0 <= value <= 1
            ):
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
        if low_threshold > high_threshold:
            raise ValueError(
                f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})"
            )
        for name, value, least in (
            ("max_lost", max_lost, 0),
            ("min_hits", min_hits, 1),
            ("motion_window", motion_window, 2),
        ):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
                raise ValueError(f"{name}: expected an int >= {least}, got {value!r}")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.iou_threshold = float(iou_threshold)
        self.low_iou_threshold = float(low_iou_threshold)
        self.max_lost = max_lost
        self.min_hits = min_hits
        self.motion_window = motion_window
        self._tracks: list[_Track] = []
        self._frame = 0  # frames seen (update calls)
        self._next_id = 1

    def reset(self) -> None:
        """Forget all tracks (e.g. at a scene cut or a new video); ids continue to increase."""
        self._tracks = []

    @property
    def active_tracks(self) -> int:
        """How many tracks (confirmed or not) are kept, including those currently lost."""
        return len(self._tracks)

    def update(self, faces: Sequence[Face]) -> list[Face]:
        """This frame's tracked faces: copies of the matched ``faces`` with ``track_id`` set.

        The result keeps the input order (``Detector.detect``: highest score first) and holds the
        faces matched to a confirmed track, including low-score detections that continue a track;
        detections that match no track and do not start one are left out. Boxes and landmarks
        are the detections' own (not smoothed).
        """
        faces = list(faces)
        scores = np.array([float(f.score) for f in faces], np.float64)
        boxes = (
            np.stack([np.asarray(f.box, np.float64).reshape(4) for f in faces])
            if faces
            else np.zeros((0, 4))
        )
        high = np.flatnonzero(scores >= self.high_threshold)
        low = np.flatnonzero((scores >= self.low_threshold) & (scores < self.high_threshold))
        tracks = self._tracks
        frame = self._frame = self._frame + 1
        predicted = np.array([t.predicted(frame) for t in tracks]).reshape(-1, 4)
        track_of: dict[int, _Track] = {}  # detection index -> its track

        # stage 1: confident detections against all tracks
        all_tracks = np.arange(len(tracks))
        pairs, unmatched_tracks, unmatched_high = _associate(
            predicted[all_tracks], boxes[high], self.iou_threshold
        )
        for ti, di in pairs:
            track_of[int(high[di])] = tracks[all_tracks[ti]]
        # stage 2: low-score detections against the unmatched tracks seen in the previous frame
        recent = np.array([i for i in all_tracks[unmatched_tracks] if tracks[i].lost == 0], int)
        pairs, _, _ = _associate(predicted[recent], boxes[low], self.low_iou_threshold)
        for ti, di in pairs:
            track_of[int(low[di])] = tracks[recent[ti]]

        matched = set(map(id, track_of.values()))
        kept = []
        for track in tracks:
            if id(track) not in matched:
                track.lost += 1
                # an unconfirmed track must be matched in consecutive frames
                if track.lost > self.max_lost or track.track_id is None:
                    continue
            kept.append(track)
        for di, track in track_of.items():
            track.add(frame, boxes[di], self.motion_window)
        for di in high[unmatched_high]:
            track = _Track(frame, boxes[di])
            track_of[int(di)] = track
            kept.append(track)
        for track in track_of.values():
            if track.track_id is None and track.hits >= self.min_hits:
                track.track_id, self._next_id = self._next_id, self._next_id + 1
        self._tracks = kept
        return [
            faces[di].with_track_id(track_of[di].track_id)
            for di in sorted(track_of)
            if track_of[di].track_id is not None
        ]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, M]`` IoU of boxes ``a [N, 4]`` and ``b [M, 4]`` (``x1, y1, x2, y2``); 0 when empty."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _associate(
    track_boxes: np.ndarray, det_boxes: np.ndarray, threshold: float
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """Match tracks to detections by IoU >= ``threshold``, maximising the total IoU.

    Returns the ``(track, detection)`` index pairs and the indices of the unmatched tracks and
    detections. Solved per connected group of the "IoU >= threshold" graph.
    """
    n, m = len(track_boxes), len(det_boxes)
    pairs: list[tuple[int, int]] = []
    if n and m:
        iou = _iou(track_boxes, det_boxes)
        gate = iou >= max(threshold, 1e-9)  # IoU 0 never matches
        # the usual case first: a track and a detection that overlap only each other
        row_degree, col_degree = gate.sum(axis=1), gate.sum(axis=0)
        only = gate.argmax(axis=1)
        alone = (row_degree == 1) & (col_degree[only] == 1)
        pairs += zip(np.flatnonzero(alone).tolist(), only[alone].tolist(), strict=True)
        rows = np.flatnonzero((row_degree > 0) & ~alone)
        if len(rows):
            cols = np.flatnonzero(gate[rows].any(axis=0))
            for group_rows, group_cols in _groups(gate[np.ix_(rows, cols)]):
                r, c = rows[group_rows], cols[group_cols]
                pairs += [(int(r[i]), int(c[j])) for i, j in _match(iou[np.ix_(r, c)], threshold)]
    matched_t = {t for t, _ in pairs}
    matched_d = {d for _, d in pairs}
    unmatched_t = np.array([t for t in range(n) if t not in matched_t], int)
    unmatched_d = np.array([d for d in range(m) if d not in matched_d], int)
    return pairs, unmatched_t, unmatched_d


def _groups(gate: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """Connected components (row indices, column indices) of the bipartite graph ``gate``,
    leaving out rows and columns without any edge."""
    n, _ = gate.shape
    seen_rows = np.zeros(n, bool)
    seen_cols = np.zeros(gate.shape[1], bool)
    groups = []
    for start in np.flatnonzero(gate.any(axis=1)):
        if seen_rows[start]:
            continue
        rows, cols, frontier = [int(start)], [], [int(start)]
        seen_rows[start] = True
        while frontier:
            new_cols = np.flatnonzero(gate[frontier].any(axis=0) & ~seen_cols)
            seen_cols[new_cols] = True
            cols += new_cols.tolist()
            new_rows = np.flatnonzero(gate[:, new_cols].any(axis=1) & ~seen_rows)
            seen_rows[new_rows] = True
            rows += new_rows.tolist()
            frontier = new_rows.tolist()
        groups.append((rows, cols))
    return groups


def _match(iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Optimal matching of rows to columns: pairs with IoU >= ``threshold`` cost ``1 - IoU``,
    leaving a row or column unmatched costs ``1 - threshold`` (so a pair is only worth making
    when it clears the threshold); minimum total cost."""
    n, m = iou.shape
    big = 1e6
    # rows x (columns + one "unmatched" column per row); a column left unmatched costs nothing
    # here and ``1 - threshold`` through the row's unmatched column, so both sides are even
    cost = np.full((n, m + n), big)
    cost[:, :m] = np.where(iou >= threshold, 1.0 - iou, big)
    cost[np.arange(n), m + np.arange(n)] = 1.0 - threshold
    assignment = _hungarian(cost)
    return [(r, c) for r, c in enumerate(assignment) if c < m and iou[r, c] >= threshold]


def _hungarian(cost: np.ndarray) -> list[int]:
    """Minimum-cost assignment of each row of ``cost [n, k]`` (``n <= k``) to a distinct column.

    The shortest-augmenting-path form of the Hungarian algorithm with row / column potentials,
    ``O(n^2 k)``: each row is added in turn and the cheapest alternating path (in reduced costs)
    from it to a free column is applied. Returns the column of each row.
    """
    n, k = cost.shape
    u = np.zeros(n + 1)  # row potentials (index 0 unused)
    v = np.zeros(k + 1)  # column potentials; column 0 is a virtual start column
    owner = np.zeros(k + 1, int)  # row (1-based) holding each column, 0 = free
    came_from = np.zeros(k + 1, int)  # previous column on the shortest path
    for row in range(1, n + 1):
        owner[0] = row
        col = 0
        slack = np.full(k + 1, np.inf)
        used = np.zeros(k + 1, bool)
        while True:
            used[col] = True
            r = owner[col]
            reduced = cost[r - 1] - u[r] - v[1:]
            free = ~used[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better] = reduced[better]
            came_from[1:][better] = col
            candidates = np.where(free, slack[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[owner[used]] += delta
            v[used] -= delta
            slack[~used] -= delta
            col = nxt
            if owner[col] == 0:
                break
        while col:  # flip the path
            prev = came_from[col]
            owner[col] = owner[prev]
            col = prev
    assignment = [0] * n
    for c in range(1, k + 1):
        if owner[c]:
            assignment[owner[c] - 1] = c - 1
    return assignment
