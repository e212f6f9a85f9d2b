"""``Face``: one detection (box, score, five landmarks) in input-image pixels."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class Face:
    """A detected face.

    ``box``: ``[4]`` float32 ``(x1, y1, x2, y2)`` in input pixels; ``score``: face probability;
    ``landmarks``: ``[5, 2]`` float32 ``(x, y)`` for left eye, right eye, nose, left and right
    mouth corner (the original's order; "left" is the image-left side). ``track_id``: the
    identity a :class:`~retinaface_jax.inference.tracking.FaceTracker` gave the face across video
    frames (``None`` for a plain detection).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray
    track_id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``box`` [4], ``score``, ``landmarks`` [5][2] (plain floats),
        plus ``id`` (the ``track_id``) for a tracked face only."""
        out: dict[str, Any] = {
            "box": [float(v) for v in self.box],
            "score": float(self.score),
            "landmarks": [[float(x), float(y)] for x, y in self.landmarks],
        }
        if self.track_id is not None:
            out["id"] = int(self.track_id)
        return out

    def with_track_id(self, track_id: int) -> Face:
        """A copy of this face with ``track_id`` set (arrays shared, not copied)."""
        return dataclasses.replace(self, track_id=int(track_id))

    @classmethod
    def from_row(cls, row: np.ndarray) -> Face:
        """From one original-layout row ``[x1, y1, x2, y2, score, 10 landmark coords]``."""
        (face,) = cls.from_rows(np.reshape(row, (1, 15)))
        return face

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> list[Face]:
        """:meth:`from_row` for every row of a ``[K, 15]`` array, copying the array once.

        Each face's ``box`` and ``landmarks`` are views into that one copy (never into
        ``rows``): one copy costs less than a copy per face.
        """
        rows = np.array(rows, dtype=np.float32, copy=True).reshape(-1, 15)
        boxes, landmarks = rows[:, :4], rows[:, 5:15].reshape(-1, 5, 2)
        # the frozen dataclass's __init__ sets each field through object.__setattr__; setting
        # the slots directly builds the same objects with less overhead
        new, set_box, set_score, set_landmarks, set_track_id = (
            object.__new__,
            cls.box.__set__,  # type: ignore[attr-defined]
            cls.score.__set__,  # type: ignore[attr-defined]
            cls.landmarks.__set__,  # type: ignore[attr-defined]
            cls.track_id.__set__,  # type: ignore[attr-defined]
        )
        faces = []
        for b, s, lm in zip(boxes, rows[:, 4].tolist(), landmarks, strict=True):
            face = new(cls)
            set_box(face, b)
            set_score(face, s)
            set_landmarks(face, lm)
            set_track_id(face, None)
            faces.append(face)
        return faces

    def to_row(self) -> np.ndarray:
        """The original's ``[15]`` row layout (inverse of :meth:`from_row`)."""
        return np.concatenate([self.box, [self.score], self.landmarks.reshape(-1)]).astype(
            np.float32
        )

    def __repr__(self) -> str:
        x1, y1, x2, y2 = (round(float(v), 1) for v in self.box)
        tid = "" if self.track_id is None else f", track_id={self.track_id}"
        return f"Face(box=({x1}, {y1}, {x2}, {y2}), score={self.score:.4f}{tid})"
