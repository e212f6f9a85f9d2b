"""Rotated faces: recall and cost of ``Detector(rotations=(0, 90, 180, 270))`` vs the plain one.

    python benchmarks/rotations.py [--images 36] [--threshold 0.6] [--max-size N]

Every ``len(val) / N``-th shared WIDER FACE val image (original scale unless ``--max-size``) is
detected upright by the plain detector: its faces scoring >= ``--threshold`` are the reference.
Each image is then turned counterclockwise by 90, 180 and 270 degrees (and kept at 0) and detected
by both detectors; a reference face is recalled when a detection scoring >= ``--threshold``,
mapped back to the upright frame, has IoU >= 0.5 with it. "extra" counts detections >= threshold
matching no reference face, "(GT n)" how many of them match a labelled face (IoU >= 0.5; the
rest are false positives or unlabelled faces). Cost: seconds per ``detect`` call of
each side on the same turned images, the two sides alternating image by image, after an untimed
pass that compiles every bucket.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np
from common import machine, shared_dir

from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc

SHARED = shared_dir()
WEIGHTS = SHARED / "data" / "weights" / "mobilenet0.25_Final.pth"
VAL = SHARED / "data" / "widerface" / "val" / "images"
ANGLES = (0, 90, 180, 270)


def machine_state() -> str:
    """The machine line plus the current load (other sessions share this CPU)."""
    load = os.getloadavg()
    return f"{machine()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Continuous IoU of boxes ``a [N, 4]`` and ``b [M, 4]`` -> ``[N, M]``."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def ground_truth() -> dict[str, np.ndarray]:
    """The val subset's labelled boxes ``[M, 4]`` (x1, y1, x2, y2) by image path."""
    out: dict[str, list[list[float]]] = {}
    name = ""
    for line in (VAL.parent / "label.txt").read_text().splitlines():
        if line.startswith("#"):
            name = line[1:].strip()
            out[name] = []
        elif line.strip():
            x, y, w, h = (float(v) for v in line.split()[:4])
            out[name].append([x, y, x + w, y + h])
    return {k: np.array(v, np.float32).reshape(-1, 4) for k, v in out.items()}


def boxes(faces, threshold: float) -> np.ndarray:
    """``[K, 15]`` rows of the faces scoring at least ``threshold``."""
    rows = [[*f.box, f.score, *f.landmarks.ravel()] for f in faces if f.score >= threshold]
    return np.array(rows, np.float32).reshape(-1, 15)


def main() -> None:
    reexec_with_tuned_malloc()  # as detect.py does
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=36, help="number of val images (spread out)")
    ap.add_argument("--threshold", type=float, default=0.6, help="score threshold (vis: 0.6)")
    ap.add_argument("--max-size", type=int, default=None, help="scale the long side to N")
    args = ap.parse_args()
    from retinaface_jax.inference.detector import Detector
    from retinaface_jax.inference.rotations import map_rows_back, rotate_image
    from retinaface_jax.weights.load import load_model

    print(machine_state())
    paths = sorted(VAL.glob("*/*.jpg"))
    paths = paths[:: max(1, len(paths) // args.images)][: args.images]
    model = load_model(WEIGHTS)
    plain = Detector(model, max_size=args.max_size)
    rotating = Detector(model, max_size=args.max_size, rotations=ANGLES)
    sides = {"without": plain, "with": rotating}
    thr = args.threshold
    print(
        f"{len(paths)} WIDER val images, "
        f"{'original scale' if args.max_size is None else f'long side {args.max_size}'}, "
        f"score >= {thr}, IoU >= 0.5; rotations=(0, 90, 180, 270) vs none"
    )

    images = [cv2.imread(str(p)) for p in paths]
    labels = ground_truth()
    gt = [labels[f"{p.parent.name}/{p.name}"] for p in paths]
    reference = [boxes(plain.detect(img), thr) for img in images]
    turned = {a: [np.ascontiguousarray(rotate_image(img, a)) for img in images] for a in ANGLES}
    t = time.perf_counter()
    for a in ANGLES:  # untimed: compiles every bucket of both sides
        for img in turned[a]:
            for det in sides.values():
                det.detect(img)
    print(f"warm-up (compiling): {time.perf_counter() - t:.1f} s")

    seconds = {name: [] for name in sides}
    found = {(a, name): [0, 0, 0] for a in ANGLES for name in sides}  # recalled, extra, GT
    for a in ANGLES:
        for i, img in enumerate(turned[a]):
            h, w = images[i].shape[:2]
            order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
            for name, det in order:
                t = time.perf_counter()
                faces = det.detect(img)
                seconds[name].append(time.perf_counter() - t)
                back = map_rows_back(boxes(faces, thr), a, h, w)
                ref = reference[i]
                m = iou(ref[:, :4], back[:, :4]) if len(ref) and len(back) else None
                hit = 0 if m is None else int((m.max(axis=1) >= 0.5).sum())
                unmatched = back if m is None else back[m.max(axis=0) < 0.5]
                labelled = 0
                if len(unmatched) and len(gt[i]):
                    labelled = int((iou(unmatched[:, :4], gt[i]).max(axis=1) >= 0.5).sum())
                found[(a, name)][0] += hit
                found[(a, name)][1] += len(unmatched)
                found[(a, name)][2] += labelled

    total = sum(len(r) for r in reference)
    print(f"\nreference: {total} faces found upright (score >= {thr})")
    print("angle  recall without        recall with           extra without   extra with")
    for a in ANGLES:
        (h0, e0, g0), (h1, e1, g1) = found[(a, "without")], found[(a, "with")]
        print(
            f"{a:5d}  {h0:5d}/{total} = {h0 / total:.3f}  {h1:5d}/{total} = {h1 / total:.3f}"
            f"  {e0:5d} (GT {g0:3d})  {e1:5d} (GT {g1:3d})"
        )
    t0, t1 = (float(np.mean(seconds[n])) for n in ("without", "with"))
    m0, m1 = (float(np.median(seconds[n])) for n in ("without", "with"))
    print(
        f"\ncost per detect call (same run, alternating, {len(seconds['with'])} calls each): "
        f"with {t1 * 1e3:.0f} ms mean / {m1 * 1e3:.0f} ms median, without "
        f"{t0 * 1e3:.0f} ms / {m0 * 1e3:.0f} ms: {t1 / t0:.2f}x (means), {m1 / m0:.2f}x (medians)"
    )
    print("\n" + machine_state())


if __name__ == "__main__":
    main()
