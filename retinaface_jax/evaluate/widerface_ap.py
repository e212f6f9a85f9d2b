"""The official WIDER FACE val AP (easy / medium / hard), vectorised per image.

Same algorithm and quirks as the official evaluation script shipped with the original
(``widerface_evaluate/evaluation.py``), restated here:

1. Scores are min-max normalised over *all* predictions of the set (the running min starts at 1
   and the max at 0, as in the official code).
2. Per image, each prediction (in the given row order, which the original writes by descending
   score) takes its highest-IoU face (IoU with the ``+1`` pixel convention, boxes ``x, y, x+w,
   y+h``). If that IoU >= 0.5: a face outside the setting (not in ``wider_<setting>_val.mat``)
   makes the prediction "ignored"; a face in the setting is recalled the first time it is hit.
   Images with no face box or no prediction add their faces to the count but nothing to the curve.
3. For thresholds ``1 - (t+1)/1000``, ``t = 0..999``: the last prediction (in row order) with
   normalised score >= threshold defines, for that image, the number of non-ignored proposals up
   to it and the faces recalled up to it; these are summed over images.
4. precision = recalled / proposals, recall = recalled / faces in the setting, AP = VOC area under
   the precision envelope.

A setting with no ground-truth face among the evaluated images (a partial set: e.g. only images
whose faces are all "hard") has no recall, and the official code prints ``nan`` for it. Here such a
setting is *skipped*: it is absent from ``ap`` / ``precision`` / ``recall`` and
:attr:`WiderFaceEvaluation.skipped` says why (a ``UserWarning`` too). Scores must lie in
``[0, 1]`` and be finite (see ``text_rows``); negative widths/heights are evaluated as the official
code does.

The original loops over the 1000 thresholds and the predictions in Python. Here each image costs
one broadcast IoU matrix and its argmax; everything else runs once over all predictions of the set:
a first-hit mask, per-image cumulative counts, one ``searchsorted`` giving the first threshold each
prediction passes, and a ``bincount`` over thresholds of the per-image increments.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from retinaface_jax.evaluate.matching import (
    best_matches,
    first_hits,
    pairwise_iou,
    xywh_to_x1y1x2y2,
)
from retinaface_jax.evaluate.predictions_io import read_predictions
from retinaface_jax.evaluate.text_rows import invalid_detection
from retinaface_jax.evaluate.widerface_gt import SETTINGS, WiderFaceGT, load_widerface_gt

PROTOCOL = (
    "WIDER FACE val, official evaluation: scores min-max normalised over the evaluated set, "
    "1000 thresholds, IoU >= 0.5 (+1 pixel), easy/medium/hard faces from wider_<setting>_val.mat"
)


@dataclasses.dataclass(frozen=True)
class WiderFaceEvaluation:
    """AP per setting plus what is needed to report and plot it.

    ``ap``, ``precision`` and ``recall`` hold only the settings that could be computed;
    ``skipped`` maps each other setting to the reason (no ``nan`` values are ever returned).
    """

    ap: dict[str, float]
    precision: dict[str, np.ndarray]  # [num_thresholds], high threshold first
    recall: dict[str, np.ndarray]
    num_faces: dict[str, int]  # all three settings (0 for a skipped one)
    num_images: int  # images evaluated (those with predictions)
    num_gt_images: int  # images in the ground truth
    seconds: float
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def partial(self) -> bool:
        return self.num_images < self.num_gt_images

    def coverage_message(self) -> str:
        return (
            f"evaluated {self.num_images} of {self.num_gt_images} WIDER FACE val images "
            f"(easy/medium/hard faces: {self.num_faces['easy']}/{self.num_faces['medium']}/"
            f"{self.num_faces['hard']})"
        )

    def skipped_message(self) -> str:
        """``"easy: reason; hard: reason"`` for the skipped settings ("" when none)."""
        return "; ".join(f"{s}: {why}" for s, why in self.skipped.items())


def _check_predictions(
    predictions: Mapping[str, np.ndarray], gt: WiderFaceGT
) -> dict[int, np.ndarray]:
    """Validate names and shapes -> ``{gt index: float64 [N,5]}`` (copies; inputs untouched)."""
    gt.require_known(predictions, "prediction name(s)")
    index = gt.index
    out = {}
    for key, rows in predictions.items():
        a = np.array(rows, dtype=np.float64, copy=True)
        if a.size == 0:
            a = a.reshape(0, 5)
        if a.ndim != 2 or a.shape[1] != 5:
            raise ValueError(
                f"predictions[{key!r}]: expected shape [N, 5] (x, y, w, h, score), got {a.shape}"
            )
        bad = invalid_detection(a, negative_size_ok=True)
        if bad is not None:
            raise ValueError(f"predictions[{key!r}] row {bad[0]}: {bad[1]}: {a[bad[0]].tolist()}")
        out[index[key]] = a
    return out


def _normalise_scores(preds: dict[int, np.ndarray]) -> None:
    """Official min-max normalisation, in place on the copies (running min from 1, max from 0)."""
    nonempty = [a[:, 4] for a in preds.values() if len(a)]
    if not nonempty:
        raise ValueError("no predicted boxes at all: WIDER FACE AP is undefined")
    lo = min(1.0, min(float(s.min()) for s in nonempty))
    hi = max(0.0, max(float(s.max()) for s in nonempty))
    if hi == lo:
        raise ValueError(f"all prediction scores equal {hi}: min-max normalisation is undefined")
    for a in preds.values():
        if len(a):
            a[:, 4] = (a[:, 4] - lo) / (hi - lo)


def _match(
    boxes: np.ndarray, faces: list[np.ndarray], num_preds: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """For every prediction (images concatenated, ``x1, y1, x2, y2``): the index of its
    highest-IoU face (first on ties; counted over all images' faces) and whether that IoU
    reaches the threshold. One broadcast IoU matrix per image (cheaper than flat pair lists)."""
    best = np.zeros(len(boxes), dtype=np.int64)
    hit = np.zeros(len(boxes), dtype=bool)
    end = np.cumsum(num_preds)
    face_start = 0
    for a, b, f in zip(end - num_preds, end, faces, strict=True):
        local, hit[a:b] = best_matches(pairwise_iou(boxes[a:b], f, 1.0), iou_threshold)
        best[a:b] = face_start + local
        face_start += len(f)
    return best, hit


def _segment_cumsum(flags: np.ndarray, seg_first: np.ndarray, seg_len: np.ndarray) -> np.ndarray:
    """Cumulative sum of ``flags`` restarting at every image."""
    total = np.cumsum(flags, dtype=np.int64)
    return total - np.repeat(total[seg_first] - flags[seg_first], seg_len)


def _threshold_records(first_t: np.ndarray, image: np.ndarray, t: int) -> np.ndarray:
    """Indices of the predictions that are, from threshold ``first_t`` on, the *last* prediction
    (in row order) of their image passing the threshold: the official ``r_index``. A prediction
    is one iff it passes somewhere and every later prediction of its image passes strictly later.
    """
    offset = image * (t + 2)  # makes the running minimum restart at each image
    suffix_min = np.minimum.accumulate((first_t + offset)[::-1])[::-1] - offset
    later_min = np.full(len(first_t), t + 1)
    same = image[1:] == image[:-1]
    later_min[:-1][same] = suffix_min[1:][same]
    return np.flatnonzero((first_t < later_min) & (first_t < t))


def _pr_curve(
    values: np.ndarray, records: np.ndarray, first_t: np.ndarray, image: np.ndarray, t: int
) -> np.ndarray:
    """Sum over images of ``values[r_index(image, threshold)]`` for every threshold: each record
    adds its increase over the image's previous record from its threshold on."""
    v = values[records]
    img = image[records]
    step = v.astype(np.float64)
    step[1:] -= np.where(img[1:] == img[:-1], v[:-1], 0)
    return np.cumsum(np.bincount(first_t[records], weights=step, minlength=t))


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the monotone precision envelope at the points where recall changes (VOC)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate_widerface(
    predictions: Mapping[str, np.ndarray] | str | Path,
    gt: WiderFaceGT | str | Path,
    *,
    iou_threshold: float = 0.5,
    num_thresholds: int = 1000,
) -> WiderFaceEvaluation:
    """Official WIDER FACE evaluation of ``{"event/image": [N,5] x,y,w,h,score}`` (or a prediction
    directory) against ``gt`` (a loaded :class:`WiderFaceGT` or the GT directory).

    Only the images present in ``predictions`` are evaluated (their faces alone are counted); a
    setting without faces among them is skipped (see :class:`WiderFaceEvaluation`).
    """
    start = time.perf_counter()
    if not isinstance(gt, WiderFaceGT):
        gt = load_widerface_gt(gt)
    if isinstance(predictions, str | Path):
        predictions = read_predictions(predictions)
    preds = _check_predictions(predictions, gt)
    _normalise_scores(preds)
    thresholds = 1 - (np.arange(num_thresholds) + 1) / num_thresholds
    ascending = thresholds[::-1].copy()

    faces = {s: sum(int(gt.keep[s][i].sum()) for i in preds) for s in SETTINGS}
    pr = {s: np.zeros((num_thresholds, 2)) for s in SETTINGS}
    # images with no face box or no prediction add faces but nothing to the curves
    used = [i for i in sorted(preds) if len(preds[i]) and len(gt.boxes[i])]
    if used:
        num_preds = np.array([len(preds[i]) for i in used])
        rows = np.concatenate([preds[i] for i in used])
        image = np.repeat(np.arange(len(used)), num_preds)
        faces_xyxy = [xywh_to_x1y1x2y2(gt.boxes[i]) for i in used]
        best, hit = _match(xywh_to_x1y1x2y2(rows[:, :4]), faces_xyxy, num_preds, iou_threshold)
        # first threshold index t at which a prediction passes (score >= 1 - (t+1)/T); T = never
        first_t = num_thresholds - np.searchsorted(ascending, rows[:, 4], side="right")
        records = _threshold_records(first_t, image, num_thresholds)
        seg_first = np.cumsum(num_preds) - num_preds
        for s in SETTINGS:
            kept = np.concatenate([gt.keep[s][i] for i in used])[best]
            proposals = _segment_cumsum(~(hit & ~kept), seg_first, num_preds)
            recalled = _segment_cumsum(first_hits(best, hit & kept), seg_first, num_preds)
            pr[s][:, 0] = _pr_curve(proposals, records, first_t, image, num_thresholds)
            pr[s][:, 1] = _pr_curve(recalled, records, first_t, image, num_thresholds)

    ap, precision, recall = {}, {}, {}
    skipped = _skipped_settings(faces, len(preds))
    with np.errstate(divide="ignore", invalid="ignore"):
        for s in SETTINGS:
            if s in skipped:
                continue
            precision[s] = pr[s][:, 1] / pr[s][:, 0]
            recall[s] = pr[s][:, 1] / faces[s]
            ap[s] = voc_ap(recall[s], precision[s])
    result = WiderFaceEvaluation(
        ap=ap,
        precision=precision,
        recall=recall,
        num_faces=faces,
        num_images=len(preds),
        num_gt_images=len(gt),
        seconds=time.perf_counter() - start,
        skipped=skipped,
    )
    if result.partial:
        warnings.warn(
            f"WIDER FACE AP: predictions cover only some images; {result.coverage_message()}",
            stacklevel=2,
        )
    if skipped:
        warnings.warn(f"WIDER FACE AP skipped for {result.skipped_message()}", stacklevel=2)
    return result


def _skipped_settings(faces: dict[str, int], num_images: int) -> dict[str, str]:
    """Settings whose AP is undefined (no face to recall) -> the reason, for the report."""
    return {
        s: f"no {s} ground-truth faces among the {num_images} evaluated image(s)"
        for s in SETTINGS
        if faces[s] == 0
    }


def widerface_ap(
    predictions: Mapping[str, np.ndarray] | str | Path, gt_dir: WiderFaceGT | str | Path
) -> dict[str, float]:
    """Official WIDER FACE val AP ``{'easy', 'medium', 'hard'}`` of ``predictions``
    (``{"event/image": [N, 5] (x, y, w, h, score)}`` or a directory of per-image txt files).

    When predictions cover only some val images, only those are evaluated and a ``UserWarning``
    says how many (use :func:`evaluate_widerface` for the counts and PR curves). A setting with no
    ground-truth face among those images has no AP: its key is *omitted* (never ``nan``) and a
    ``UserWarning`` names it and the reason (``evaluate_widerface(...).skipped``).
    """
    return dict(evaluate_widerface(predictions, gt_dir).ap)
