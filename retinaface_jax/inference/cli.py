"""``python detect.py``: detect faces in images, folders, videos and live streams (camera index,
rtsp/http(s) URL); write annotated copies + JSON.

Every input is processed even when some fail: an unreadable, undecodable, oversized or
unwritable input is named on stderr, skipped, and makes the exit status 1 at the end. Outputs
never replace an input file (nor one written earlier in the run), whatever extension they end up
with. A live stream is processed as its frames arrive, dropping the frames that arrive while the
previous one is being detected; Ctrl-C or the end of the stream closes its output video playable.
User errors (bad options, bad weights, no network for the download) are one line on stderr;
``--debug`` or ``RETINAFACE_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from retinaface_jax.backends.native.build import KERNEL_CHOICES
from retinaface_jax.cli_errors import add_debug_flag, describe, run_cli
from retinaface_jax.inference.align import align_faces
from retinaface_jax.inference.anonymize import anonymize
from retinaface_jax.inference.draw import draw_faces
from retinaface_jax.inference.face import Face
from retinaface_jax.inference.preprocess import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    ImageError,
    check_pixels,
    default_max_pixels,
    load_image,
    max_pixels_limit,
)
from retinaface_jax.inference.rotations import parse_rotations
from retinaface_jax.inference.stream import (
    LiveStream,
    StreamFrame,
    Window,
    display_name,
    display_problem,
    file_stem,
    is_stream,
)
from retinaface_jax.inference.video import VideoError, VideoReader, is_video, open_writer

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".jp2",
    ".pgm",
    ".ppm",
    ".pbm",
    ".pnm",
    ".sr",
    ".ras",
    ".exr",
    ".hdr",
    ".pic",
)
PROGRESS_MIN_INPUTS = 4
PROG = "detect.py"
# errors that skip one input instead of ending the run (cv2.error: OpenCV refusing an image)
INPUT_ERRORS = (ImageError, VideoError, OSError, ValueError, RuntimeError, MemoryError, cv2.error)


# --anonymize covers faces from this score: with 0.6 (the visualisation threshold) faces scoring
# just under it stayed uncovered and the changed surroundings lifted some over 0.6 (up to 0.755
# with "solid" on the shared images); from 0.5 no face >= 0.6 is found afterwards (max 0.525;
# lower thresholds cover so many false positives that new face-like patterns appear: 0.71 at 0.2)
ANONYMIZE_THRESHOLD = 0.5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="RetinaFace face detection (boxes, scores, five landmarks) in JAX.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR_OR_VIDEO_OR_STREAM",
        help="image files, directories (searched recursively), video files, camera indices "
        "(0, 1...) or stream URLs (rtsp://, http://, https://...)",
    )
    p.add_argument(
        "--backbone",
        default=None,
        choices=["mobilenet0.25", "resnet50"],
        help="official model to fetch and cache when --weights is not given (default "
        "mobilenet0.25); with --weights, the backbone of that file (default: inferred)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="checkpoint: original .pth/.tar file or native checkpoint directory",
    )
    p.add_argument(
        "--output",
        default="detections",
        type=Path,
        help="directory for annotated images/videos and crops (default ./detections)",
    )
    p.add_argument(
        "--json",
        default=None,
        metavar="FILE|-",
        help="write one JSON object per image (per frame for videos); '-' = stdout",
    )
    p.add_argument(
        "--save-crops",
        action="store_true",
        help="also save 112x112 aligned face crops (ArcFace template) per face",
    )
    p.add_argument("--no-draw", action="store_true", help="do not write annotated images/videos")
    p.add_argument(
        "--anonymize",
        choices=["blur", "pixelate", "solid"],
        default=None,
        help="write anonymised images/videos instead of annotated ones: every face scoring at "
        "least --anonymize-threshold is blurred, pixelated or blacked out (box + half its size "
        "on each side), and no boxes, scores or landmarks are drawn (--save-crops still saves "
        "the original faces; --no-draw writes no images/videos at all)",
    )
    p.add_argument(
        "--anonymize-threshold",
        type=float,
        default=ANONYMIZE_THRESHOLD,
        help=f"faces scoring at least this are anonymised (default {ANONYMIZE_THRESHOLD}: below "
        "--vis-threshold, so that faces just under it are covered too)",
    )
    p.add_argument(
        "--show",
        action="store_true",
        help="also show videos and streams in a window as they are processed (q or Esc "
        "stops); without a display: a warning, and the run goes on without the window",
    )
    p.add_argument(
        "--track",
        action="store_true",
        help="videos and streams: follow faces from frame to frame (a new face from a score of "
        '--vis-threshold); the JSON lists the tracked faces, each with its "id", also drawn '
        "above the box (images: not tracked, with a note)",
    )
    p.add_argument(
        "--vis-threshold",
        type=float,
        default=None,
        help="draw/crop faces scoring at least this (default: config, 0.6)",
    )
    p.add_argument("--conf-threshold", type=float, default=None, help="default: config, 0.02")
    p.add_argument("--nms-threshold", type=float, default=None, help="default: config, 0.4")
    p.add_argument("--top-k", type=int, default=None, help="default: config, 5000")
    p.add_argument("--keep-top-k", type=int, default=None, help="default: config, 750")
    p.add_argument(
        "--min-face",
        type=float,
        default=None,
        metavar="N",
        help="drop faces whose box is narrower or lower than N pixels (input scale)",
    )
    p.add_argument(
        "--rotations",
        type=parse_rotations,
        default=None,
        metavar="A,B,...",
        help="detect in copies of each image rotated counterclockwise by these angles "
        "(multiples of 90; 0 = the image itself), merged by NMS: 0,90,180,270 finds faces at "
        "any quarter turn, at one detector run per angle (default: 0 only)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--origin-size", action="store_true", help="run at the original image scale (default)"
    )
    size.add_argument(
        "--target-size",
        type=int,
        default=None,
        help="scale the short side to N (with --max-size M: the original "
        "test_widerface.py rule, e.g. 1600 / 2150)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=None,
        help="cap the long side at M (alone: scale the long side to exactly M)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default="auto",
        help="auto: our native CPU kernels when JAX runs on the CPU and they build (once per "
        "machine), else XLA; native: require them; xla: never use them",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help=f"skip images (and videos) of more than N pixels, checked from the file header "
        f"before decoding (default: ${MAX_PIXELS_ENV} or {DEFAULT_MAX_PIXELS:,}; 0 = no limit)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad option values up front (a usage error, exit 2), before any work is done."""
    for flag in ("batch_size", "top_k", "keep_top_k", "target_size", "max_size"):
        v = getattr(args, flag)
        if v is not None and v <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {v}")
    for flag in ("vis_threshold", "conf_threshold", "nms_threshold", "anonymize_threshold"):
        v = getattr(args, flag)
        if v is not None and not 0.0 <= v <= 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be between 0 and 1, got {v}")
    if args.min_face is not None and not 0.0 <= args.min_face < float("inf"):
        parser.error(f"--min-face must be a number of pixels >= 0, got {args.min_face}")
    if args.max_pixels is not None and args.max_pixels < 0:
        parser.error(f"--max-pixels must be >= 0 (0 = no limit), got {args.max_pixels}")
    if args.origin_size and args.max_size is not None:
        parser.error("--origin-size cannot be combined with --max-size")


def collect_inputs(paths: Sequence[str]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Expand arguments to ``(file, root)`` pairs (root: the directory argument it came from, or its
    own parent); missing paths are returned as error messages."""
    files: list[tuple[Path, Path]] = []
    errors: list[str] = []
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file() and (f.suffix.lower() in IMAGE_EXTENSIONS or is_video(f))
            )
            if not found:
                errors.append(f"{p}: directory contains no images or videos")
            files.extend((f, p) for f in found)
        elif p.is_file():
            files.append((p, p.parent))
        elif p.exists():
            errors.append(f"{p}: not a regular file or directory")
        else:
            errors.append(f"{p}: no such file or directory")
    return files, errors


class _Outputs:
    """Chooses output paths: mirrors directory structure, never an input file, never twice."""

    def __init__(self, out_dir: Path, inputs: Sequence[Path], reserved: Sequence[Path] = ()):
        self.out_dir = out_dir
        self.inputs = {p.resolve() for p in inputs}
        self.input_ids = {_file_id(p) for p in inputs} - {None}  # hard links to an input too
        self.used: set[Path] = {p.resolve() for p in reserved}

    def _taken(self, path: Path) -> bool:
        resolved = path.resolve()
        if resolved in self.inputs or resolved in self.used:
            return True
        return _file_id(path) in self.input_ids

    def path_for(self, src: Path, root: Path, sub: str = "", suffix: str | None = None) -> Path:
        """``OUT/[sub/]<src relative to root>`` (with ``suffix`` if given), renamed
        ``<stem>_det[N]`` if it would hit an input or an output already written in this run."""
        try:
            rel = src.resolve().relative_to(root.resolve())
        except ValueError:
            rel = Path(src.name)
        if suffix is not None:
            rel = rel.with_name(rel.stem + suffix)
        base = self.out_dir / sub if sub else self.out_dir
        cand = base / rel
        n = 0
        while self._taken(cand):
            n += 1
            cand = base / rel.with_name(f"{rel.stem}_det{'' if n == 1 else n}{rel.suffix}")
        self.used.add(cand.resolve())
        cand.parent.mkdir(parents=True, exist_ok=True)
        return cand


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def encode_image(image: np.ndarray, suffix: str) -> tuple[str, np.ndarray]:
    """``(suffix, encoded bytes)``: in the input's format if OpenCV can write it there (e.g. not
    3-channel .pgm, nor .exr without OpenEXR), else as PNG."""
    for ext in dict.fromkeys((suffix.lower() or ".png", ".png")):
        ok, buf = _try_encode(ext, image)
        if ok:
            return (suffix if ext == suffix.lower() else ext), buf
    raise ImageError(f"cannot encode a {image.shape} {image.dtype} image")


def _try_encode(ext: str, image: np.ndarray) -> tuple[bool, np.ndarray]:
    """``cv2.imencode`` without its error log (a refused format only means the PNG fallback)."""
    logging = cv2.utils.logging
    level = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        return cv2.imencode(ext, image)
    except cv2.error:
        return False, np.empty(0, np.uint8)
    finally:
        logging.setLogLevel(level)


class _Runner:
    def __init__(
        self, args: argparse.Namespace, detector: Any, json_out: IO[str] | None, outputs: _Outputs
    ):
        self.args, self.det, self.json_out, self.outputs = args, detector, json_out, outputs
        self.vis = detector.cfg.vis_threshold if args.vis_threshold is None else args.vis_threshold
        self.kw = {
            "conf_threshold": args.conf_threshold,
            "nms_threshold": args.nms_threshold,
        }
        if args.top_k is not None:
            self.kw["top_k"] = args.top_k
        if args.keep_top_k is not None:
            self.kw["keep_top_k"] = args.keep_top_k
        if args.min_face is not None:
            self.kw["min_face"] = args.min_face
        self.failed: dict[Path | str, str] = {}  # input -> first error
        self.num_faces = 0
        self.streams_done = 0  # live streams started (opened or not)
        self.frames_dropped = 0  # over all live streams
        self.interrupted = False  # Ctrl-C ended a live stream: no further input is started
        self.show = args.show
        if self.show and (problem := display_problem()) is not None:
            print(f"{PROG}: warning: --show: {problem}; not showing frames", file=sys.stderr)
            self.show = False

    def fail(self, src: Path | str, msg: str, error: BaseException | None = None) -> None:
        """Report one failed input (once) and carry on; ``--debug`` adds the traceback."""
        if error is not None and self.args.debug:
            traceback.print_exception(error, file=sys.stderr)
        if src not in self.failed:
            self.failed[src] = msg
        print(f"error: {msg} (skipped)", file=sys.stderr)

    def fail_with(self, src: Path | str, what: str, error: BaseException) -> None:
        """``fail`` for an exception: ImageError/VideoError messages already name the input."""
        if isinstance(error, ImageError | VideoError) and str(error).startswith(str(src)):
            self.fail(src, str(error), error)
        else:
            self.fail(src, f"{src}: {what}: {describe(error)}", error)

    def tracker(self) -> Any:
        """A new face tracker for one video or stream with ``--track``, else None."""
        return make_tracker(self.vis) if self.args.track else None

    def track(self, tracker: Any, faces: list[Face]) -> list[Face]:
        """With a tracker: this frame's tracked faces (with their ids), else ``faces``."""
        return faces if tracker is None else list(tracker.update(faces))

    def window(self, name: str) -> Window | None:
        """The ``--show`` window for one video or stream (None without ``--show``); an OpenCV
        without GUI support turns ``--show`` off with a warning."""
        if not self.show:
            return None
        try:
            return Window(f"{PROG}: {name}")
        except cv2.error as e:
            why = _opencv_message(e)
            print(f"{PROG}: warning: --show: cannot open a window: {why}", file=sys.stderr)
            self.show = False
            return None

    def render(self, image: np.ndarray, faces: list[Face], tracked: bool = False) -> np.ndarray:
        """The written image/frame: anonymised with ``--anonymize``, else the faces drawn; the
        faces scoring >= --vis-threshold, or every tracked face (a track continues through
        low-score frames of its face, e.g. turned away: still drawn, still anonymised)."""
        vis = 0.0 if tracked else self.vis
        if self.args.anonymize:
            cover = 0.0 if tracked else min(self.args.anonymize_threshold, vis)
            return anonymize(image, faces, self.args.anonymize, min_score=cover)
        return draw_faces(image, faces, vis)

    def emit(self, record: dict[str, Any]) -> None:
        if self.json_out is not None:
            self.json_out.write(json.dumps(record) + "\n")
            self.json_out.flush()

    def write(self, src: Path, root: Path, image: np.ndarray, sub: str = "") -> Path:
        """Encode (falling back to PNG), then pick the path for the format actually written."""
        suffix, buf = encode_image(image, src.suffix)
        path = self.outputs.path_for(src, root, sub, suffix)
        buf.tofile(str(path))
        return path

    def save(self, src: Path, root: Path, image: np.ndarray, faces: list[Face]) -> None:
        try:
            if not self.args.no_draw:
                self.write(src, root, self.render(image, faces))
            if self.args.save_crops:
                shown = [f for f in faces if f.score >= self.vis]
                for i, crop in enumerate(align_faces(image, shown)):
                    self.write(src.with_name(f"{src.stem}_face{i:03d}.png"), root, crop, "crops")
        except INPUT_ERRORS as e:
            self.fail_with(src, "cannot write the output", e)

    def detect(self, chunk: list[tuple[Path, Any]]) -> list[list[Face] | None]:
        """Faces per image of a batch; if the batch fails, image by image (None = failed)."""
        try:
            return list(self.det.detect_batch([img for _, img in chunk], **self.kw))
        except INPUT_ERRORS as e:
            if len(chunk) == 1:
                self.fail_with(chunk[0][0], "detection failed", e)
                return [None]
        return [self.detect([item])[0] for item in chunk]

    def load(self, src: Path) -> np.ndarray | None:
        try:
            return load_image(src)
        except INPUT_ERRORS as e:
            self.fail_with(src, "cannot read the image", e)
            return None

    def images(self, items: list[tuple[Path, Path]], bar) -> None:
        bs = max(1, self.args.batch_size)
        for s in range(0, len(items), bs):
            chunk = []
            for src, root in items[s : s + bs]:
                img = self.load(src)
                if img is None:
                    bar.update(1)
                else:
                    chunk.append((src, root, img))
            if not chunk:
                continue
            results = self.detect([(src, img) for src, _, img in chunk])
            for (src, root, img), faces in zip(chunk, results, strict=True):
                if faces is not None:
                    self.num_faces += len(faces)
                    self.emit({"image": str(src), "faces": [f.to_dict() for f in faces]})
                    self.save(src, root, img, faces)
                bar.update(1)

    def video(self, src: Path, root: Path) -> None:
        try:
            reader = VideoReader(src)
        except INPUT_ERRORS as e:
            self.fail_with(src, "cannot open the video", e)
            return
        writer = None
        frames: list[np.ndarray] = []
        index = 0
        tracker = self.tracker()
        window = self.window(str(src))

        def flush():
            nonlocal index
            results = self.det.detect_batch(frames, **self.kw) if frames else []
            stop = False
            for frame, found in zip(frames, results, strict=True):
                faces = self.track(tracker, found)
                self.num_faces += len(faces)
                self.emit(
                    {"image": str(src), "frame": index, "faces": [f.to_dict() for f in faces]}
                )
                index += 1
                if writer is not None or window is not None:
                    shown = self.render(frame, faces, tracker is not None)
                    if writer is not None:
                        writer.write(shown)
                    if window is not None and not window.show(shown):
                        stop = True  # q/Esc: the rest of the batch is not reported either
                        break
            frames.clear()
            if stop:
                raise _StopRequested

        try:
            check_pixels(str(src), *reader.size)
            if not self.args.no_draw:
                writer = open_writer(
                    self.outputs.path_for(src, root), reader.fps, reader.size, reader.fourcc
                )
            try:
                for frame in reader:
                    frames.append(frame)
                    if len(frames) >= max(1, self.args.batch_size):
                        flush()
            finally:
                flush()  # the frames read before a decoding error are still processed
            if reader.frames_read == 0:
                self.fail(src, f"{src}: no frames could be read from the video")
        except _StopRequested:
            pass
        except INPUT_ERRORS as e:
            self.fail_with(src, "video failed", e)
        finally:
            reader.close()
            if writer is not None:
                writer.release()
            if window is not None:
                window.close()

    def stream(self, source: str) -> None:
        """Process a live source as its frames arrive, newest frame first (the ones that arrive
        during a detection are dropped and counted); ends with the source, q/Esc in the
        ``--show`` window, or Ctrl-C, which also stops the run after this stream's outputs are
        closed."""
        self.streams_done += 1
        name = display_name(source)  # never a password in messages, JSON or file names
        try:
            live = LiveStream(source)
        except INPUT_ERRORS as e:
            self.fail_with(name, "cannot open the stream", e)
            return
        writer, window, tracker = None, self.window(name), self.tracker()
        processed, how, size = 0, "ended", (0, 0)
        try:
            while (item := live.next()) is not None:
                if processed == 0:
                    h, w = item.image.shape[:2]
                    check_pixels(name, w, h)
                    size = (w, h)
                    if not self.args.no_draw:
                        path = self.outputs.path_for(Path(file_stem(source) + ".avi"), Path("."))
                        writer = open_writer(path, live.fps or 25.0, size, "MJPG")
                go_on = self.stream_frame(name, item, tracker, writer, size, window)
                processed += 1
                if not go_on:
                    how = "stopped from the window"
                    break
            if live.error is not None:
                self.fail(
                    name, f"{name}: reading stopped after {live.received} frames: {live.error}"
                )
            elif processed == 0:
                self.fail(name, f"{name}: no frames could be read from the stream")
        except KeyboardInterrupt:
            how, self.interrupted = "interrupted (Ctrl-C)", True
        except INPUT_ERRORS as e:
            how = "failed"
            self.fail_with(name, "stream failed", e)
        finally:
            with _sigint_deferred():  # a second Ctrl-C must not leave the video unfinished
                live.close()
                if writer is not None:
                    writer.release()
                if window is not None:
                    window.close()
            self.frames_dropped += live.dropped
            print(
                f"{name}: {how}; {processed} frame(s) processed, {live.dropped} dropped",
                file=sys.stderr,
            )

    def stream_frame(
        self,
        name: str,
        item: StreamFrame,
        tracker: Any,
        writer: cv2.VideoWriter | None,
        size: tuple[int, int],
        window: Window | None,
    ) -> bool:
        """Detect, report and write one live frame; False when the window asks to stop."""
        faces = self.track(tracker, self.det.detect_batch([item.image], **self.kw)[0])
        self.num_faces += len(faces)
        self.emit(
            {
                "image": name,
                "frame": item.index,
                "time": round(item.time, 4),
                "wall_time": round(item.wall_time, 4),
                "dropped": item.dropped,
                "faces": [f.to_dict() for f in faces],
            }
        )
        if writer is None and window is None:
            return True
        shown = self.render(item.image, faces, tracker is not None)
        if writer is not None:
            w, h = size
            if shown.shape[:2] != (h, w):  # a source changing its frame size mid-stream
                shown = cv2.resize(shown, (w, h), interpolation=cv2.INTER_AREA)
            writer.write(shown)
        return window is None or window.show(shown)


def _opencv_message(error: cv2.error) -> str:
    """A ``cv2.error``'s message on one line, without OpenCV's version/source-file prefix."""
    text = " ".join(str(error).split())
    return re.sub(r"^OpenCV\([^)]*\)\s+\S+:\s+error:\s+\([^)]*\)\s*", "", text) or text


class _StopRequested(Exception):
    """q/Esc or a closed ``--show`` window: stop the current video."""


class _sigint_deferred:
    """Ignore Ctrl-C inside the block (main thread only), so cleanup runs to its end."""

    def __enter__(self) -> None:
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def make_tracker(vis_threshold: float) -> Any:
    """A new :class:`~retinaface_jax.inference.tracking.FaceTracker` whose tracks start at faces
    scoring >= ``vis_threshold`` (the faces the CLI draws), its other settings the defaults."""
    from retinaface_jax.inference.tracking import FaceTracker

    # the tracker's default low threshold (0.1) must not exceed the high one
    return FaceTracker(high_threshold=vis_threshold, low_threshold=min(0.1, vis_threshold))


def main(argv: Sequence[str] | None = None, *, detector: Any = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 if any input failed, 2 usage or user error).

    ``detector`` injects a ready ``Detector`` (tests, embedding); otherwise one is built from
    ``--weights`` / ``--backbone`` and the size options. User errors (bad weights, no network,
    an unusable ``--output``) are one line on stderr unless ``--debug`` / ``RETINAFACE_DEBUG=1``.
    """
    return run_cli(PROG, lambda a: _main(a, detector), argv)


def _main(argv: Sequence[str] | None, detector: Any) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        max_pixels = default_max_pixels() if args.max_pixels is None else args.max_pixels
    except ValueError as e:
        parser.error(str(e))
    streams = [a for a in args.inputs if is_stream(a)]
    files, errors = collect_inputs([a for a in args.inputs if not is_stream(a)])
    for msg in errors:
        print(f"error: {msg} (skipped)", file=sys.stderr)
    input_paths = [f for f, _ in files]
    json_path = None if args.json in (None, "-") else Path(args.json)
    if json_path is not None and json_path.resolve() in {p.resolve() for p in input_paths}:
        parser.error(f"--json {json_path} is one of the inputs; refusing to overwrite it")
    if not files and not streams:
        print(f"{PROG}: error: no input to process", file=sys.stderr)
        return 1
    if args.track and any(not is_video(f) for f, _ in files):
        print(
            f"{PROG}: note: --track applies to videos and streams; images are not tracked",
            file=sys.stderr,
        )
    if detector is None:
        from retinaface_jax.inference.detector import Detector

        detector = Detector.from_pretrained(
            args.weights or args.backbone or "mobilenet0.25",
            backbone=args.backbone,
            target_size=args.target_size,
            max_size=args.max_size,
            batch_size=args.batch_size,
            progress=not args.quiet,
            kernels=args.kernels,
            rotations=args.rotations,
        )
    args.output.mkdir(parents=True, exist_ok=True)
    outputs = _Outputs(args.output, input_paths, [json_path] if json_path else [])
    with max_pixels_limit(max_pixels):
        runner = _run(args, detector, json_path, outputs, files, streams)
    failed = len(runner.failed) + len(errors)
    done = len(files) + runner.streams_done - len(runner.failed)
    dropped = f", {runner.frames_dropped} stream frame(s) dropped" if runner.streams_done else ""
    print(
        f"{done} input(s) processed, {runner.num_faces} face(s) found, {failed} failed"
        f"{dropped}; outputs in {args.output}",
        file=sys.stderr,
    )
    if runner.interrupted:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 1 if failed else 0


def _run(
    args: argparse.Namespace,
    detector: Any,
    json_path: Path | None,
    outputs: _Outputs,
    files: list[tuple[Path, Path]],
    streams: Sequence[str] = (),
) -> _Runner:
    """Process every input (images first, in batches, then videos, then live streams); returns
    the runner."""
    from tqdm import tqdm

    json_out: IO[str] | None
    if args.json == "-":
        json_out = sys.stdout
    elif json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_out = open(json_path, "w", encoding="utf-8")  # noqa: SIM115
    else:
        json_out = None
    runner = _Runner(args, detector, json_out, outputs)
    images = [(f, r) for f, r in files if not is_video(f)]
    videos = [(f, r) for f, r in files if is_video(f)]
    try:
        with tqdm(
            total=len(files),
            unit="file",
            file=sys.stderr,
            disable=args.quiet or len(files) < PROGRESS_MIN_INPUTS,
        ) as bar:
            runner.images(images, bar)
            for src, root in videos:
                runner.video(src, root)
                bar.update(1)
        for source in streams:
            if runner.interrupted:
                break
            runner.stream(source)
    finally:
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
    return runner
