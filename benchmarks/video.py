"""Video speed: frames/s of detection, tracking and anonymisation vs the ONNX anchor's forward pass.

    python benchmarks/video.py [--sizes 640x480,1280x720] [--frames 40] [--repeats 40]

The video is synthetic: a camera pan over the shared demo photo (``biubug6_curve_test.jpg``, a
crowd), scaled so the frame shows about two thirds of it, the window moving diagonally across
the photo over ``--frames`` frames, so every face moves a few pixels per frame (decoded up front;
decoding is excluded). Per frame, each pipeline runs on the next frame of the video (the tracker
restarts when the video does):

- ``detect``: ``Detector.detect`` (pre-processing + forward + decode + NMS + Face objects);
- ``+ track``: then ``FaceTracker.update``;
- ``+ anonymize``: then ``anonymize(frame, faces, "blur", min_score=0.6)`` (a blurred copy);
- ``+ track + anonymize``: every tracked face blurred (tracked faces include low-score
  continuations of a track, which is what tracking adds to anonymisation);

and the ONNX anchor: onnxruntime ``session.run`` on the frame already pre-processed (forward
only). All run in this process, timed in alternating blocks (``common.alternating_medians``):
medians per frame, frames/s = 1 / median, and each pipeline's time over the anchor's. The cost of
tracking and of anonymising alone (on precomputed detections) is printed too.
"""

from __future__ import annotations

import argparse
import os
import time

import cv2
import numpy as np
from common import alternating_medians, machine, onnx_anchor, shared_dir, warm_up

from retinaface_jax.malloc_tuning import reexec_with_tuned_malloc

SHARED = shared_dir()
WEIGHTS = SHARED / "data" / "weights" / "mobilenet0.25_Final.pth"
IMAGE = SHARED / "data" / "images" / "biubug6_curve_test.jpg"
VIS_THRESHOLD = 0.6  # the CLI's default --vis-threshold: faces anonymised without tracking


def machine_state() -> str:
    """The machine line plus the current load (other developers share this CPU)."""
    load = os.getloadavg()
    return f"{machine()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def pan_frames(width: int, height: int, n: int) -> list[np.ndarray]:
    """``n`` frames ``[height, width, 3]`` of a diagonal camera pan over the shared photo."""
    src = cv2.imread(str(IMAGE))
    # the frame covers ~2/3 of the photo's width and height (whichever needs the larger scale)
    scale = max(1.5 * width / src.shape[1], 1.5 * height / src.shape[0])
    src = cv2.resize(src, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    span_x, span_y = src.shape[1] - width, src.shape[0] - height
    frames = []
    for i in range(n):
        s = i / max(n - 1, 1)
        x, y = round(s * span_x), round(s * span_y)
        frames.append(np.ascontiguousarray(src[y : y + height, x : x + width]))
    return frames


def anchor_input(image: np.ndarray) -> np.ndarray:
    """The anchor's input ``[1, 3, H, W]`` float32 BGR minus the mean, prepared outside the timing."""
    x = image.astype(np.float32) - np.float32([104, 117, 123])
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def cycling(step, n: int):
    """A no-argument function running ``step(frame_index, restart)`` on the next of ``n`` frames
    (``restart`` true when the video starts over)."""
    state = {"i": -1}

    def call():
        state["i"] = i = (state["i"] + 1) % n
        return step(i, i == 0)

    return call


def bench_size(det, anchor_forward, width: int, height: int, n_frames: int, repeats: int) -> None:
    from retinaface_jax import FaceTracker, anonymize

    frames = pan_frames(width, height, n_frames)
    xs = [anchor_input(f) for f in frames]
    trackers = {"track": FaceTracker(), "both": FaceTracker()}

    def detect(i, restart):
        return det.detect(frames[i])

    def track(i, restart, name="track"):
        if restart:
            trackers[name].reset()
        return trackers[name].update(det.detect(frames[i]))

    def blur(i, restart):
        return anonymize(frames[i], det.detect(frames[i]), "blur", min_score=VIS_THRESHOLD)

    def both(i, restart):
        return anonymize(frames[i], track(i, restart, "both"), "blur")

    def anchor(i, restart):
        return anchor_forward(xs[i])

    steps = {
        "ONNX anchor forward only": anchor,
        "detect": detect,
        "detect + track": track,
        "detect + anonymize (blur)": blur,
        "detect + track + anonymize": both,
    }
    fns = {name: cycling(step, len(frames)) for name, step in steps.items()}
    warm_up(fns)
    t = alternating_medians(fns, repeats)

    # the parts alone, on detections computed once
    faces = [det.detect(f) for f in frames]
    confident = [sum(f.score >= VIS_THRESHOLD for f in fs) for fs in faces]
    tracker = FaceTracker()
    start = time.perf_counter()
    tracked = [tracker.update(fs) for fs in faces]
    track_alone = (time.perf_counter() - start) / len(frames)
    start = time.perf_counter()
    for f, fs in zip(frames, faces, strict=True):
        anonymize(f, fs, "blur", min_score=VIS_THRESHOLD)
    blur_alone = (time.perf_counter() - start) / len(frames)
    ids = {f.track_id for fs in tracked for f in fs}

    anchor_t = t["ONNX anchor forward only"]
    print(
        f"\n[{width}x{height}] pan over {IMAGE.name}, {len(frames)} frames, "
        f"{np.mean(confident):.1f} faces >= {VIS_THRESHOLD} per frame, "
        f"{np.mean([len(fs) for fs in tracked]):.1f} tracked per frame ({len(ids)} ids); "
        f"median of {repeats} frames each"
    )
    print(f"  {'pipeline':30s} {'ms/frame':>9} {'frames/s':>9} {'ours / anchor':>14}")
    for name, seconds in t.items():
        ratio = "" if seconds is anchor_t else f"{seconds / anchor_t:13.2f}x"
        print(f"  {name:30s} {seconds * 1e3:9.2f} {1 / seconds:9.1f} {ratio:>14}")
    print(
        f"  alone, on precomputed detections: FaceTracker.update {track_alone * 1e3:.2f} ms/frame, "
        f"anonymize blur {blur_alone * 1e3:.2f} ms/frame"
    )


def main() -> None:
    reexec_with_tuned_malloc()  # as detect.py does
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="640x480,1280x720", help="WxH list")
    ap.add_argument("--frames", type=int, default=40, help="frames of the synthetic video")
    ap.add_argument("--repeats", type=int, default=40, help="timed frames per pipeline")
    args = ap.parse_args()
    from retinaface_jax.inference.detector import Detector
    from retinaface_jax.weights.load import load_model

    print(machine_state())
    det = Detector(load_model(WEIGHTS))
    session, _ = onnx_anchor(SHARED)

    def anchor_forward(x_nchw: np.ndarray):
        return session.run(None, {"input": x_nchw})

    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        bench_size(det, anchor_forward, w, h, args.frames, args.repeats)
    print(
        "\nours / anchor: our whole per-frame pipeline over the anchor's forward pass alone "
        "(< 1: faster). 2 shared cores: expect tens of percent of noise between runs."
    )
    print(machine_state())


if __name__ == "__main__":
    main()
