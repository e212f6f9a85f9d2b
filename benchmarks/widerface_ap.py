"""Time the official WIDER FACE AP on the full synthetic golden set (3,226 val images).

    python benchmarks/widerface_ap.py [--shared ../shared] [--repeat 3]

Prints the time of (a) GT loading, (b) the evaluation of in-memory predictions, (c) writing and
(d) reading + evaluating the per-image txt files, and checks the AP against the golden values.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from retinaface_jax.evaluate.predictions_io import read_predictions, write_predictions
from retinaface_jax.evaluate.widerface_ap import evaluate_widerface
from retinaface_jax.evaluate.widerface_gt import load_widerface_gt

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("RETINAFACE_SHARED", str(REPO.parent / "shared"))
    parser.add_argument("--shared", type=Path, default=Path(default))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with np.load(args.shared / "golden" / "widerface_eval_synthetic_seed0.npz") as g:
        rows = np.split(g["boxes_xywh_score"], np.cumsum(g["counts"])[:-1])
        preds = {str(n): r for n, r in zip(g["names"], rows, strict=True)}
        expected = {s: float(g[f"ap_{s}"]) for s in ("easy", "medium", "hard")}
    gt_dir = args.shared / "data" / "widerface" / "gt"

    t = time.perf_counter()
    gt = load_widerface_gt(gt_dir)
    print(f"load GT (.mat):                 {time.perf_counter() - t:7.3f} s")
    best = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        result = evaluate_widerface(preds, gt)
        best = min(best, time.perf_counter() - t)
    print(f"AP, in memory (best of {args.repeat}):     {best:7.3f} s  ({len(preds)} images)")
    t = time.perf_counter()
    evaluate_widerface(preds, gt_dir)
    print(f"AP incl. GT loading:            {time.perf_counter() - t:7.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_predictions(tmp, preds)
        print(f"write 3,226 txt files:          {time.perf_counter() - t:7.3f} s")
        t = time.perf_counter()
        from_files = evaluate_widerface(read_predictions(tmp), gt_dir)
        print(f"read txt + GT + AP (CLI path):  {time.perf_counter() - t:7.3f} s")
    for s in ("easy", "medium", "hard"):
        d = max(abs(result.ap[s] - expected[s]), abs(from_files.ap[s] - expected[s]))
        print(f"{s:6s} AP {result.ap[s]:.10f}  golden {expected[s]:.10f}  max |diff| {d:.1e}")


if __name__ == "__main__":
    main()
