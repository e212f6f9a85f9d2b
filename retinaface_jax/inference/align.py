"""Face alignment: warp each face by a 5-point similarity transform onto the ArcFace template.

Template (``ARCFACE_TEMPLATE_112``): the standard 112 x 112 five-point layout used by ArcFace /
InsightFace recognition models, in ``(x, y)`` pixels of the 112 x 112 crop, in RetinaFace's
landmark order (left eye, right eye, nose, left mouth corner, right mouth corner):
``(38.2946, 51.6963) (73.5318, 51.5014) (56.0252, 71.7366) (41.5493, 92.3655) (70.7299, 92.2041)``.
For another ``size`` the template is scaled by ``size / 112``. The similarity (rotation, uniform
scale, translation; no reflection) is the least-squares estimate of Umeyama (1991).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from retinaface_jax.inference.face import Face

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def template(size: int = 112) -> np.ndarray:
    """The five target points ``[5, 2]`` for a ``size x size`` crop."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The ``[3, 3]`` similarity ``T`` minimising ``sum |dst_i - T(src_i)|^2`` (Umeyama 1991).

    ``src``, ``dst``: ``[N, 2]`` corresponding points, ``N >= 2``. Reflections are excluded.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(
            f"umeyama_similarity: expected two [N>=2, 2] arrays, got {src.shape}, {dst.shape}"
        )
    n = src.shape[0]
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / n
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = np.sum(sc**2) / n
    scale = float(np.sum(sig * d) / var_s) if var_s > 0 else 1.0
    out = np.eye(3)
    out[:2, :2] = scale * rot
    out[:2, 2] = mu_d - scale * rot @ mu_s
    return out


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``[2, 3]`` affine matrix taking image pixels to the ``size x size`` aligned crop."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    return umeyama_similarity(lm, template(size))[:2]


def align_faces(
    image: np.ndarray, faces: Sequence[Face] | Sequence[np.ndarray], size: int = 112
) -> np.ndarray:
    """Aligned crops ``[N, size, size, C]`` (same dtype/channels as ``image``), one per face.

    ``faces``: :class:`Face` objects or ``[5, 2]`` landmark arrays in ``image`` pixels. Pixels
    outside the image are black. Bilinear interpolation (``cv2.warpAffine``).
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"align_faces: size must be a positive int, got {size!r}")
    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(
            f"align_faces: expected an [H, W] or [H, W, C] image, got shape {img.shape}"
        )
    crops = []
    for f in faces:
        lm = f.landmarks if isinstance(f, Face) else np.asarray(f)
        m = alignment_matrix(lm, size)
        crops.append(cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0))
    if not crops:
        return np.zeros((0, size, size, *img.shape[2:]), dtype=img.dtype)
    return np.stack(crops).reshape(len(crops), size, size, *img.shape[2:])
