"""Detection speed: ours end to end vs the ONNX anchor's forward pass, same run, same inputs.

    python benchmarks/detect.py [--val-limit N] [--repeats R] [--skip-cli]

1. 640x480, batch 1: ``Detector.detect`` on a decoded array (pre-processing + jitted forward +
   decode/top-k + NMS + Face objects; image decode excluded) vs onnxruntime ``session.run`` on
   the already pre-processed ``[1,3,480,640]`` input (forward only). Median of R runs each.
2. The shared WIDER FACE val images at original scale: the same comparison per image (all images
   decoded up front; our programs compiled in a warm-up pass; ours and the anchor alternate in
   blocks of 25 images), plus ``detect_batch`` images/s.
3. Cold / warm start of ``python detect.py IMAGE`` in a subprocess with an empty cache dir
   (cold: compile + convert the weights to a native checkpoint; warm: everything from the cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from common import REPO, alternating_medians, machine, onnx_anchor, shared_dir, warm_up

from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc

SHARED = shared_dir()
WEIGHTS = SHARED / "data" / "weights" / "mobilenet0.25_Final.pth"
IMAGE = SHARED / "data" / "images" / "biubug6_curve_test.jpg"
VAL = SHARED / "data" / "widerface" / "val" / "images"
VAL_CHUNK = 25  # images per alternating block in the val comparison


def machine_state() -> str:
    """The machine line plus the current load (other developers share this CPU)."""
    load = os.getloadavg()
    return f"{machine()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def anchor_input(image: np.ndarray) -> np.ndarray:
    """The anchor's input ``[1, 3, H, W]`` float32 BGR minus the mean, prepared outside the timing."""
    x = image.astype(np.float32) - np.float32([104, 117, 123])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def bench_640(det, anchor_forward, repeats: int) -> None:
    img = cv2.resize(cv2.imread(str(IMAGE)), (640, 480), interpolation=cv2.INTER_AREA)
    x = anchor_input(img)
    fns = {"ours": lambda: det.detect(img), "anchor": lambda: anchor_forward(x)}
    warm_up(fns)
    t = alternating_medians(fns, repeats)
    ours, anchor = t["ours"], t["anchor"]
    n = len(det.detect(img))
    print(
        f"\n[640x480 batch 1] input: {IMAGE.name} resized to 640x480, {n} faces (default "
        f"thresholds), median of {repeats}"
    )
    print(f"  ours end to end (preprocess+forward+decode/top-k+NMS): {ours * 1e3:8.2f} ms")
    print(f"  ONNX anchor forward only:                               {anchor * 1e3:8.2f} ms")
    print(f"  ratio ours / anchor: {ours / anchor:.2f}x  (goal <= 1.00x)")


def bench_val(det, anchor_forward, limit: int | None, batch_size: int) -> None:
    paths = sorted(VAL.rglob("*.jpg"))[:limit]
    images = [cv2.imread(str(p)) for p in paths]
    shapes = {im.shape[:2] for im in images}
    buckets = {det.bucket_of(*s) for s in shapes}
    print(
        f"\n[WIDER FACE val, original scale] {len(images)} images, {len(shapes)} distinct sizes "
        f"-> {len(buckets)} size buckets"
    )
    t = time.perf_counter()
    for im in images:  # warm-up: compiles one program per bucket (or loads it from the cache)
        det.detect(im)
    print(f"  warm-up pass (compile/load {len(buckets)} programs): {time.perf_counter() - t:.1f} s")
    xs = [anchor_input(im) for im in images]
    for x in xs[:2]:
        anchor_forward(x)
    # alternate in chunks of images, so both totals see the same machine load
    ours = anchor = 0.0
    for start in range(0, len(images), VAL_CHUNK):
        time.sleep(0.2)
        t = time.perf_counter()
        for im in images[start : start + VAL_CHUNK]:
            det.detect(im)
        ours += time.perf_counter() - t
        time.sleep(0.2)
        t = time.perf_counter()
        for x in xs[start : start + VAL_CHUNK]:
            anchor_forward(x)
        anchor += time.perf_counter() - t
    print(
        f"  ours end to end, detect() per image: {ours:7.2f} s  ({ours / len(images) * 1e3:.1f} "
        f"ms/image)"
    )
    print(
        f"  ONNX anchor forward only per image:  {anchor:7.2f} s  "
        f"({anchor / len(images) * 1e3:.1f} ms/image)"
    )
    print(f"  ratio ours / anchor: {ours / anchor:.2f}x")
    det.batch_size = batch_size
    t = time.perf_counter()
    det.detect_batch(images)  # warm-up: batch programs per bucket (compiled or from the cache)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    det.detect_batch(images)
    dt = time.perf_counter() - t
    print(
        f"  detect_batch (batch_size {batch_size}): {len(images) / dt:.2f} images/s "
        f"({dt:.1f} s; warm-up pass {warm:.1f} s) vs detect() {len(images) / ours:.2f} images/s "
        f"vs anchor forward {len(images) / anchor:.2f} images/s"
    )


def bench_cli() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="retinaface_bench_"))
    try:
        cache = tmp / "cache"
        cache.mkdir()
        # as after a completed download: the official file in the cache dir
        shutil.copy(WEIGHTS, cache / "detection_mobilenet0.25_Final.pth")
        env = {**os.environ, "RETINAFACE_CACHE": str(cache)}
        env.pop("RETINAFACE_WEIGHTS", None)
        cmd = [
            sys.executable,
            str(REPO / "detect.py"),
            str(IMAGE),
            "--output",
            str(tmp / "o"),
            "--quiet",
        ]
        print(f"\n[CLI start] {' '.join(cmd[1:3])} {IMAGE.name}, fresh RETINAFACE_CACHE")
        for label in (
            "cold (compile, convert weights)",
            "warm (compilation cache, native ckpt)",
            "warm again",
        ):
            t = time.perf_counter()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            dt = time.perf_counter() - t
            status = "ok" if r.returncode == 0 else f"exit {r.returncode}: {r.stderr[-300:]}"
            print(f"  {label:40s} {dt:6.1f} s  ({status})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    reexec_with_tuned_malloc()  # as detect.py does
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--val-limit", type=int, default=None, help="use only the first N val images")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--skip-val", action="store_true")
    args = ap.parse_args()
    from retinaface_jax.inference.detector import Detector
    from retinaface_jax.weights.load import load_model

    print(machine_state())
    print(f"weights: {WEIGHTS}")
    t = time.perf_counter()
    det = Detector(load_model(WEIGHTS))
    print(f"model load: {time.perf_counter() - t:.1f} s; compilation cache: {det.cache_dir}")
    session, _ = onnx_anchor(SHARED)

    def anchor_forward(x_nchw: np.ndarray):
        return session.run(None, {"input": x_nchw})

    bench_640(det, anchor_forward, args.repeats)
    if not args.skip_val:
        bench_val(det, anchor_forward, args.val_limit, args.batch_size)
    if not args.skip_cli:
        bench_cli()
    print("\n" + machine_state())


if __name__ == "__main__":
    main()
