"""WIDER FACE AP: equals the original evaluation on the golden synthetic set and on the original's
own predictions for the 403 shared val images; agrees with a plain loop transcription of the
official per-image algorithm on random cases; reports partial coverage; rejects bad input."""

from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest

import retinaface_jax
from retinaface_jax.evaluate.predictions_io import write_predictions
from retinaface_jax.evaluate.widerface_ap import evaluate_widerface, widerface_ap
from retinaface_jax.evaluate.widerface_gt import WiderFaceGT, load_widerface_gt


@pytest.fixture(scope="module")
def gt_dir(shared):
    return shared / "data" / "widerface" / "gt"


@pytest.fixture(scope="module")
def gt(gt_dir):
    return load_widerface_gt(gt_dir)


@pytest.fixture(scope="module")
def synthetic(golden):
    g = golden("widerface_eval_synthetic_seed0")
    ends = np.cumsum(g["counts"])
    rows = np.split(g["boxes_xywh_score"], ends[:-1])
    preds = {str(n): r for n, r in zip(g["names"], rows, strict=True)}
    expected = {s: float(g[f"ap_{s}"]) for s in ("easy", "medium", "hard")}
    return preds, expected


def _close(ap, expected, tol=1e-6):
    for s in ("easy", "medium", "hard"):
        assert abs(ap[s] - expected[s]) <= tol, (s, ap[s], expected[s])


def test_public_export():
    assert retinaface_jax.widerface_ap is widerface_ap


def test_synthetic_golden_in_memory_full_set(synthetic, gt_dir):
    preds, expected = synthetic
    assert len(preds) == 3226
    before = {k: v.copy() for k, v in preds.items()}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full coverage: no partial-coverage warning
        ap = widerface_ap(preds, gt_dir)
    seconds = time.perf_counter() - start
    _close(ap, expected)
    assert seconds < 10.0, f"full synthetic evaluation took {seconds:.1f} s"
    for k, v in preds.items():  # inputs untouched (the official code normalises in place)
        np.testing.assert_array_equal(v, before[k])


def test_synthetic_golden_through_txt_files(synthetic, gt, tmp_path):
    preds, expected = synthetic
    written = write_predictions(tmp_path / "pred", preds)
    assert len(written) == 3226
    result = evaluate_widerface(tmp_path / "pred", gt)
    assert result.num_images == result.num_gt_images == 3226
    _close(result.ap, expected)


def _readme_reference_ap(shared):
    text = (shared / "golden" / "README.md").read_text()
    m = re.search(r"easy ([0-9.]+), medium ([0-9.]+), hard ([0-9.]+)", text)
    assert m, "reference AP line not found in golden/README.md"
    return dict(zip(("easy", "medium", "hard"), map(float, m.groups()), strict=True))


def test_reference_predictions_of_original(shared, gt):
    expected = _readme_reference_ap(shared)
    with pytest.warns(UserWarning, match="evaluated 403 of 3226"):
        result = evaluate_widerface(
            shared / "golden" / "reference_widerface_val_subset_origin_size", gt
        )
    assert result.partial and result.num_images == 403
    _close(result.ap, expected)


def test_partial_coverage_counts_only_evaluated_images(synthetic, gt):
    preds, _ = synthetic
    subset = dict(list(preds.items())[:500])
    with pytest.warns(UserWarning, match="evaluated 500 of 3226"):
        result = evaluate_widerface(subset, gt)
    index = gt.index
    expected_faces = sum(int(gt.keep["hard"][index[k]].sum()) for k in subset)
    assert result.num_faces["hard"] == expected_faces
    assert result.num_images == 500


# --- a plain transcription of the official per-image algorithm, for random cross-checks ------


def _loop_reference(preds, boxes, keeps, iou_thr=0.5, n_thr=1000):
    """Deliberately naive: loops over detections and thresholds like the official script."""
    lo, hi = 1.0, 0.0
    for p in preds:
        if len(p):
            lo, hi = min(lo, p[:, 4].min()), max(hi, p[:, 4].max())
    aps = []
    for keep_list in keeps:
        pr = np.zeros((n_thr, 2))
        n_faces = 0
        for p, g, keep in zip(preds, boxes, keep_list, strict=True):
            n_faces += int(keep.sum())
            if len(p) == 0 or len(g) == 0:
                continue
            score = (p[:, 4] - lo) / (hi - lo)
            recalled = np.zeros(len(g))
            proposal = np.ones(len(p))
            pred_recall = np.zeros(len(p))
            for h in range(len(p)):
                ious = []
                for k in range(len(g)):
                    px1, py1, px2, py2 = p[h, 0], p[h, 1], p[h, 0] + p[h, 2], p[h, 1] + p[h, 3]
                    gx1, gy1, gx2, gy2 = g[k, 0], g[k, 1], g[k, 0] + g[k, 2], g[k, 1] + g[k, 3]
                    iw = min(px2, gx2) - max(px1, gx1) + 1
                    ih = min(py2, gy2) - max(py1, gy1) + 1
                    if iw > 0 and ih > 0:
                        union = (
                            (px2 - px1 + 1) * (py2 - py1 + 1)
                            + (gx2 - gx1 + 1) * (gy2 - gy1 + 1)
                            - iw * ih
                        )
                        ious.append(iw * ih / union)
                    else:
                        ious.append(0.0)
                k = int(np.argmax(ious))
                if ious[k] >= iou_thr:
                    if not keep[k]:
                        recalled[k] = -1
                        proposal[h] = -1
                    elif recalled[k] == 0:
                        recalled[k] = 1
                pred_recall[h] = np.sum(recalled == 1)
            for t in range(n_thr):
                passing = np.where(score >= 1 - (t + 1) / n_thr)[0]
                if len(passing):
                    r = passing[-1]
                    pr[t] += (np.sum(proposal[: r + 1] == 1), pred_recall[r])
        with np.errstate(divide="ignore", invalid="ignore"):
            prec, rec = pr[:, 1] / pr[:, 0], pr[:, 1] / n_faces
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(len(mpre) - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        aps.append(float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])))
    return dict(zip(("easy", "medium", "hard"), aps, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_equals_loop_transcription(seed):
    rng = np.random.default_rng(seed)
    names, boxes, keeps, preds = [], [], {"easy": [], "medium": [], "hard": []}, {}
    for i in range(12):
        k = int(rng.integers(0, 6)) if i else 0  # image 0: no faces at all
        g = np.column_stack([rng.integers(0, 80, (k, 2)), rng.integers(2, 30, (k, 2))]).astype(
            float
        )
        names.append(f"1--Ev/img_{i}")
        boxes.append(g)
        hard = rng.random(k) < 0.8
        medium = hard & (rng.random(k) < 0.7)
        keeps["hard"].append(hard)
        keeps["medium"].append(medium)
        keeps["easy"].append(medium & (rng.random(k) < 0.6))
        n = int(rng.integers(0, 9)) if i != 3 else 0  # image 3: no predictions
        jitter = rng.normal(0, 2, (n, 4))
        src = g[rng.integers(0, k, n)] if k else np.tile([10.0, 10, 8, 8], (n, 1))
        rows = np.column_stack([src + jitter, rng.choice([0.1, 0.5, 0.7, 0.9, 0.95], n)])
        preds[names[-1]] = rows  # rows deliberately NOT sorted by score, ties included
    gt = WiderFaceGT(tuple(names), tuple(boxes), {s: tuple(v) for s, v in keeps.items()})
    ours = evaluate_widerface(preds, gt).ap
    ref = _loop_reference(
        [preds[n] for n in names], boxes, [keeps[s] for s in ("easy", "medium", "hard")]
    )
    for s in ("easy", "medium", "hard"):
        assert ours[s] == pytest.approx(ref[s], abs=1e-12), s


# --- bad input -------------------------------------------------------------------------------


def test_unknown_image_name_is_named(gt):
    with pytest.raises(KeyError, match="0--Parade/not_an_image"):
        widerface_ap({"0--Parade/not_an_image": np.zeros((1, 5))}, gt)


def test_bad_shape_is_named(gt):
    name = gt.names[0]
    with pytest.raises(ValueError, match=re.escape(name)):
        widerface_ap({name: np.zeros((3, 4))}, gt)


def test_equal_scores_rejected(gt):
    rows = np.array([[1.0, 2, 3, 4, 0.5]])
    with pytest.raises(ValueError, match="min-max"):
        widerface_ap({gt.names[0]: rows, gt.names[1]: rows}, gt)


def test_scores_outside_unit_interval_rejected(gt):
    name = gt.names[0]
    rows = np.array([[1.0, 2, 3, 4, 0.5], [1.0, 2, 3, 4, 1.25]])
    with pytest.raises(ValueError, match=re.escape(f"predictions['{name}'] row 1: score outside")):
        widerface_ap({name: rows}, gt)
    rows[1, 4] = np.inf
    with pytest.raises(ValueError, match="row 1: non-finite"):
        widerface_ap({name: rows}, gt)


# --- partial sets: settings without faces are skipped, never nan ------------------------------


def _exact_rows(gt, name, scores=(0.9, 0.5)):
    """Predictions equal to the image's first "hard" faces, with distinct scores."""
    i = gt.index[name]
    boxes = gt.boxes[i][gt.keep["hard"][i]][: len(scores)]
    return np.column_stack([boxes, scores[: len(boxes)]])


def test_settings_without_faces_are_skipped(gt):
    # an image whose faces are all "hard": easy and medium have nothing to recall
    name = next(
        n
        for i, n in enumerate(gt.names)
        if gt.keep["hard"][i].sum() >= 2 and not gt.keep["medium"][i].any()
    )
    preds = {name: _exact_rows(gt, name)}
    with pytest.warns(UserWarning, match="skipped for easy: no easy ground-truth faces"):
        result = evaluate_widerface(preds, gt)
    assert set(result.ap) == set(result.precision) == set(result.recall) == {"hard"}
    assert np.isfinite(result.ap["hard"]) and 0 < result.ap["hard"] <= 1
    assert result.skipped == {
        s: f"no {s} ground-truth faces among the 1 evaluated image(s)" for s in ("easy", "medium")
    }
    assert result.num_faces["easy"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert set(widerface_ap(preds, gt)) == {"hard"}  # documented: the key is omitted


def test_nothing_computable_gives_an_empty_ap(gt):
    name = next(n for i, n in enumerate(gt.names) if not gt.keep["hard"][i].any())
    preds = {name: np.array([[1.0, 2, 3, 4, 0.9], [5.0, 6, 7, 8, 0.4]])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = evaluate_widerface(preds, gt)
    assert result.ap == {} and set(result.skipped) == {"easy", "medium", "hard"}


def test_pr_plot_leaves_out_skipped_settings(gt, tmp_path):
    pytest.importorskip("matplotlib")
    from retinaface_jax.evaluate.plot import plot_pr_curves

    name = next(n for i, n in enumerate(gt.names) if not gt.keep["hard"][i].any())
    preds = {name: np.array([[1.0, 2, 3, 4, 0.9], [5.0, 6, 7, 8, 0.4]])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = evaluate_widerface(preds, gt)
    assert plot_pr_curves(result, tmp_path / "pr.png").stat().st_size > 0
