"""Drawing detections like the original detect.py: box, score and five coloured landmarks, plus a
tracked face's id above its box."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from retinaface_jax.inference.face import Face

BOX_COLOR = (0, 0, 255)
TEXT_COLOR = (255, 255, 255)
ID_COLOR = (0, 255, 255)
# left eye, right eye, nose, left mouth, right mouth (BGR), as in the original
LANDMARK_COLORS = ((0, 0, 255), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 0, 0))


def draw_faces(image: np.ndarray, faces: Sequence[Face], vis_threshold: float = 0.6) -> np.ndarray:
    """A copy of the BGR uint8 ``image`` with every face scoring >= ``vis_threshold`` drawn on it
    (``#id`` above the box of a face with a ``track_id``)."""
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    for f in faces:
        if f.score < vis_threshold:
            continue
        x1, y1, x2, y2 = (int(v) for v in f.box)
        cv2.rectangle(out, (x1, y1), (x2, y2), BOX_COLOR, 2)
        cv2.putText(out, f"{f.score:.4f}", (x1, y1 + 12), cv2.FONT_HERSHEY_DUPLEX, 0.5, TEXT_COLOR)
        if f.track_id is not None:
            label = (x1, max(y1 - 5, 12))  # above the box, inside the image at the top edge
            cv2.putText(out, f"#{f.track_id}", label, cv2.FONT_HERSHEY_DUPLEX, 0.6, ID_COLOR, 2)
        for (x, y), color in zip(f.landmarks, LANDMARK_COLORS, strict=True):
            cv2.circle(out, (int(x), int(y)), 1, color, 4)
    return out
