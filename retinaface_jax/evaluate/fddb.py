"""FDDB: ellipse annotations, the detection file of the original ``test_fddb.py``, a discrete ROC.

Detection file (one file for all images, as the original writes ``FDDB_dets.txt``)::

    2002/08/11/big/img_591       image path without extension
    3.0                          number of detections, printed with one decimal
    x y w h score                ints (truncated, w = x2 - x1 + 1) and the score with 10 decimals

**Our discrete ROC differs from the official FDDB tool** (``evaluate`` from the FDDB site):

- the official tool measures overlap between the detection rectangle and the annotated *ellipse
  region* (pixel masks); we use plain IoU between the detection rectangle ``[x, x+w) x [y, y+h)``
  and the ellipse's axis-aligned *bounding box*;
- the official tool matches detections to faces one-to-one with the Hungarian algorithm
  (maximising total overlap) separately for every score threshold and counts a true positive when
  the overlap ratio is > 0.5; we match once, greedily in descending score order per image: each
  detection takes its highest-IoU face and is a true positive if that IoU >= 0.5 and no
  higher-scoring detection took the same face (the WIDER FACE rule; a detection whose best face is
  taken is a false positive even if it overlaps another face), then sweep the threshold over the
  sorted scores of all images;
- we report no continuous ROC, and evaluate only the images present (the shared fold-01 copy has
  282 of its 290 images); every annotated face of those images counts.

So numbers are close to, but not comparable with, published FDDB discrete-ROC results; use the
written detection file with the official tool for those.

Detection files and arrays are checked, errors naming the file and line (or the image): content
that is not UTF-8, a count line that is not a count or disagrees with the rows, an image listed
twice, rows with fewer than 5 numbers, non-finite numbers, negative widths or heights and scores
outside ``[0, 1]`` are *rejected*, never clipped (the original writes ``w = x2 - x1 + 1 >= 1`` and
softmax scores; clipping would hide a wrong file and tie scores in the ROC).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retinaface_jax.evaluate.matching import (
    best_matches,
    first_hits,
    pairwise_iou,
    xywh_to_x1y1x2y2,
)
from retinaface_jax.evaluate.text_rows import (
    DETECTION_FIELDS,
    check_detection_rows,
    invalid_detection,
    parse_row,
    read_lines,
)


def read_fddb_ellipses(path: str | Path) -> dict[str, np.ndarray]:
    """Parse an ``FDDB-fold-XX-ellipseList.txt`` -> ``{image path: [M, 5]}`` rows of
    ``(major_radius, minor_radius, angle, center_x, center_y)``."""
    path = Path(path)
    lines = [ln.strip() for ln in read_lines(path, "FDDB ellipse file")]
    out: dict[str, np.ndarray] = {}
    i = 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        name = lines[i]
        try:
            count = int(lines[i + 1])
        except (IndexError, ValueError):
            raise ValueError(
                f"{path}: line {i + 2}: expected the number of faces of {name}"
            ) from None
        rows = []
        for k in range(i + 2, i + 2 + count):
            line = lines[k] if k < len(lines) else "<end of file>"
            rows.append(
                parse_row(line, 5, path, k + 1, "major minor angle cx cy 1", f" for {name}")
            )
        out[name] = np.array(rows, dtype=np.float64).reshape(-1, 5)
        i += 2 + count
    return out


def read_fddb_folds(
    folds_dir: str | Path, folds: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """All ellipse annotations of ``FDDB-fold-XX-ellipseList.txt`` in ``folds_dir`` (or the listed
    fold numbers), in fold order."""
    folds_dir = Path(folds_dir)
    if not folds_dir.is_dir():
        raise FileNotFoundError(f"FDDB folds directory not found: {folds_dir}")
    if folds is None:
        paths = sorted(folds_dir.glob("FDDB-fold-[0-9][0-9]-ellipseList.txt"))
        if not paths:
            raise FileNotFoundError(f"no FDDB-fold-XX-ellipseList.txt files in {folds_dir}")
    else:
        paths = [folds_dir / f"FDDB-fold-{int(f):02d}-ellipseList.txt" for f in folds]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"FDDB fold file missing: {p}")
    out: dict[str, np.ndarray] = {}
    for p in paths:
        out.update(read_fddb_ellipses(p))
    return out


def ellipse_bounding_boxes(ellipses: np.ndarray) -> np.ndarray:
    """``[M, 5]`` ellipses (major radius, minor radius, angle of the major axis, cx, cy) ->
    their axis-aligned bounding boxes ``[M, 4]`` ``x1, y1, x2, y2``."""
    a, b, theta, cx, cy = np.asarray(ellipses, dtype=np.float64).reshape(-1, 5)[:, :5].T
    half_w = np.hypot(a * np.cos(theta), b * np.sin(theta))
    half_h = np.hypot(a * np.sin(theta), b * np.cos(theta))
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=1)


def faces_to_fddb_rows(faces: Sequence[Any]) -> np.ndarray:
    """Detector faces -> float64 ``[N, 5]`` ``x y w h score`` as the original writes them
    (``int(x1)``, ``int(x2 - x1 + 1)`` computed in float32, the float32 score)."""
    rows = np.zeros((len(faces), 5), dtype=np.float64)
    for k, face in enumerate(faces):
        x1, y1, x2, y2 = np.asarray(face.box, dtype=np.float32)[:4]
        one = np.float32(1)
        score = float(np.float32(face.score))  # the original's dets are float32
        rows[k] = (int(x1), int(y1), int(x2 - x1 + one), int(y2 - y1 + one), score)
    return rows


def format_fddb_detections(detections: Mapping[str, np.ndarray]) -> str:
    """Text of an FDDB detection file for ``{image path: [N, 5] x y w h score}``."""
    lines = []
    for name, rows in detections.items():
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        lines.append(name)
        lines.append(f"{float(len(rows)):.1f}")
        lines.extend(
            f"{int(r[0]):d} {int(r[1]):d} {int(r[2]):d} {int(r[3]):d} {r[4]:.10f}" for r in rows
        )
    return "".join(line + "\n" for line in lines)


_COUNT = re.compile(r"^\d+(\.0*)?$")


def _looks_like_row(line: str) -> bool:
    """Whether ``line`` is numbers (a detection row), not an image path."""
    fields = line.split()
    try:
        numbers = [float(f) for f in fields]
    except ValueError:
        return False
    return len(numbers) >= 2


def _read_block(lines: list[str], i: int, path: Path, name: str) -> tuple[np.ndarray, int]:
    """The rows of image ``name`` whose count is on line ``i + 2`` -> (rows, next line index)."""
    if i + 1 >= len(lines) or not _COUNT.match(lines[i + 1].strip()):
        raise ValueError(f"{path}: line {i + 2}: expected the number of detections of {name}")
    count = int(float(lines[i + 1]))
    context = f" for {name} (line {i + 2} says {count})"
    rows, linenos = [], []
    for k in range(i + 2, i + 2 + count):
        line = lines[k] if k < len(lines) else "<end of file>"
        rows.append(parse_row(line, 5, path, k + 1, DETECTION_FIELDS, context))
        linenos.append(k + 1)
    return check_detection_rows(rows, linenos, path, f" for {name}"), i + 2 + count


def read_fddb_detections(path: str | Path) -> dict[str, np.ndarray]:
    """Parse an FDDB detection file -> ``{image path: [N, 5]}``; errors name file and line
    (see the module docstring for what is rejected)."""
    path = Path(path)
    lines = read_lines(path, "FDDB detection file")
    out: dict[str, np.ndarray] = {}
    first_line: dict[str, int] = {}
    i = 0
    while i < len(lines):
        name = lines[i].strip()
        if not name:
            i += 1
            continue
        if _looks_like_row(name):
            previous = f" (more rows for {list(out)[-1]} than its count line says?)" if out else ""
            raise ValueError(
                f"{path}: line {i + 1}: expected an image path, got the numbers {name!r}{previous}"
            )
        if name in first_line:
            raise ValueError(
                f"{path}: line {i + 1}: image {name} listed twice (first at line {first_line[name]})"
            )
        first_line[name] = i + 1
        out[name], i = _read_block(lines, i, path, name)
    return out


def _check_detections(detections: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``{image: float64 [N, 5]}``; a ValueError names the image and row of a bad detection."""
    out = {}
    for name, rows in detections.items():
        a = np.asarray(rows, dtype=np.float64)
        if a.size == 0:
            a = a.reshape(0, 5)
        if a.ndim != 2 or a.shape[1] != 5:
            raise ValueError(
                f"detections[{name!r}]: expected shape [N, 5] (x, y, w, h, score), got {a.shape}"
            )
        bad = invalid_detection(a)
        if bad is not None:
            raise ValueError(f"detections[{name!r}] row {bad[0]}: {bad[1]}: {a[bad[0]].tolist()}")
        out[name] = a
    return out


@dataclasses.dataclass(frozen=True)
class FDDBRoc:
    """Discrete ROC: at each distinct score threshold (descending), false positives and TPR."""

    scores: np.ndarray
    false_positives: np.ndarray
    true_positives: np.ndarray
    num_faces: int
    num_images: int

    @property
    def tpr(self) -> np.ndarray:
        return self.true_positives / max(self.num_faces, 1)

    def tpr_at(self, max_false_positives: int) -> float:
        """Best true-positive rate with at most ``max_false_positives`` false positives."""
        ok = self.false_positives <= max_false_positives
        return float(self.tpr[ok].max()) if ok.any() else 0.0


def fddb_discrete_roc(
    detections: Mapping[str, np.ndarray],
    ellipses: Mapping[str, np.ndarray],
    iou_threshold: float = 0.5,
) -> FDDBRoc:
    """Our discrete ROC (see the module docstring) of ``{image: [N,5] x,y,w,h,score}`` over the
    images of ``detections`` (each must be annotated in ``ellipses``)."""
    unknown = [k for k in detections if k not in ellipses]
    if unknown:
        raise KeyError(
            f"{len(unknown)} detection image(s) not in the FDDB annotations, e.g. {unknown[:3]}"
        )
    scores, tps = [], []
    num_faces = 0
    for name, rows in _check_detections(detections).items():
        faces = ellipse_bounding_boxes(ellipses[name])
        num_faces += len(faces)
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        tp = np.zeros(len(rows), dtype=bool)
        if len(rows) and len(faces):
            best, hit = best_matches(
                pairwise_iou(xywh_to_x1y1x2y2(rows[:, :4]), faces), iou_threshold
            )
            tp = first_hits(best, hit)
        scores.append(rows[:, 4])
        tps.append(tp)
    score = np.concatenate(scores) if scores else np.zeros(0)
    tp = np.concatenate(tps) if tps else np.zeros(0, dtype=bool)
    order = np.argsort(-score, kind="stable")
    score, tp = score[order], tp[order]
    cum_tp, cum_fp = np.cumsum(tp), np.cumsum(~tp)
    last_of_tie = np.flatnonzero(np.append(score[1:] != score[:-1], len(score) > 0))
    return FDDBRoc(
        scores=score[last_of_tie],
        false_positives=cum_fp[last_of_tie],
        true_positives=cum_tp[last_of_tie],
        num_faces=num_faces,
        num_images=len(detections),
    )


def format_roc(roc: FDDBRoc) -> str:
    """``tpr false_positives score`` lines (like the official ``DiscROC.txt``, plus the score)."""
    return "".join(
        f"{t:.6f} {int(f)} {s:.10f}\n"
        for t, f, s in zip(roc.tpr, roc.false_positives, roc.scores, strict=True)
    )
