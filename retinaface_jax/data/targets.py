"""Fixed-size training targets: pad each image's faces to M rows plus a validity mask.

Jitted matching needs static shapes, so every image carries exactly ``max_faces`` target rows
``(x1, y1, x2, y2, 10 landmark coords, label)``; padded rows are zero and ``valid`` is False there.

Default M = 256. On the full WIDER FACE val ground truth (3,226 images) 22 images (0.7 %) have more
than 256 faces and the largest has 709 (train: up to ~2,000 in one image). When an augmented image
keeps more than M faces, the M *largest* are used (their original order is preserved): in those
crowds the dropped faces are a few pixels wide at training size, too small for any prior to reach
the 0.35 IoU of a positive match, so the loss barely changes, while M stays small enough for the
[B, M, P] IoU matrix of ``match``. Callers warn once per image whose annotation exceeds M
(:func:`warn_crowded`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

from retinaface_jax.data.labels import FaceRecord

log = logging.getLogger(__name__)

DEFAULT_MAX_FACES = 256
TARGET_WIDTH = 15  # x1 y1 x2 y2, 10 landmark coordinates, label


def pad_targets(targets: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad/trim ``targets`` [K,15] to ([max_faces,15] float32, valid [max_faces] bool).

    With K > max_faces the max_faces largest boxes (by area, ties by position) are kept, in their
    original order.
    """
    targets = np.asarray(targets, np.float32).reshape(-1, TARGET_WIDTH)
    if targets.shape[0] > max_faces:
        area = (targets[:, 2] - targets[:, 0]) * (targets[:, 3] - targets[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:max_faces])
        targets = targets[keep]
    out = np.zeros((max_faces, TARGET_WIDTH), np.float32)
    valid = np.zeros((max_faces,), bool)
    out[: targets.shape[0]] = targets
    valid[: targets.shape[0]] = True
    return out, valid


def warn_crowded(records: Iterable[FaceRecord], max_faces: int) -> list[str]:
    """Log one warning per image annotated with more than ``max_faces`` faces; return their paths.

    Augmentation only removes faces, so these are exactly the images whose targets may be trimmed.
    """
    crowded = [r for r in records if r.num_faces > max_faces]
    for r in crowded:
        log.warning(
            "%s has %d faces > max_faces=%d: samples keeping more than %d faces use the %d largest",
            r.path,
            r.num_faces,
            max_faces,
            max_faces,
            max_faces,
        )
    return [r.path for r in crowded]
