"""``python detect.py``: detect faces in images, folders and videos; write annotated copies + JSON.

Every input is processed even when some fail: an unreadable or non-image file is named on stderr,
skipped, and makes the exit status 1 at the end. Outputs never replace an input file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np

from retinaface_jax.inference.align import align_faces
from retinaface_jax.inference.draw import draw_faces
from retinaface_jax.inference.face import Face
from retinaface_jax.inference.preprocess import ImageError, load_image
from retinaface_jax.inference.video import VideoError, VideoReader, is_video, open_writer
from retinaface_jax.kernels.native import KERNEL_CHOICES

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detect.py",
        description="RetinaFace face detection (boxes, scores, five landmarks) in JAX.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="IMAGE_OR_DIR_OR_VIDEO",
        help="image files, directories (searched recursively) or video files",
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
        "--vis-threshold",
        type=float,
        default=None,
        help="draw/crop faces scoring at least this (default: config, 0.6)",
    )
    p.add_argument("--conf-threshold", type=float, default=None, help="default: config, 0.02")
    p.add_argument("--nms-threshold", type=float, default=None, help="default: config, 0.4")
    p.add_argument("--top-k", type=int, default=None, help="default: config, 5000")
    p.add_argument("--keep-top-k", type=int, default=None, help="default: config, 750")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


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
        else:
            errors.append(f"{p}: no such file or directory")
    return files, errors


class _Outputs:
    """Chooses output paths: mirrors directory structure, never an input file, never twice."""

    def __init__(self, out_dir: Path, inputs: Sequence[Path]):
        self.out_dir = out_dir
        self.inputs = {p.resolve() for p in inputs}
        self.used: set[Path] = set()

    def path_for(self, src: Path, root: Path, sub: str = "") -> Path:
        """``OUT/[sub/]<src relative to root>``, renamed ``<stem>_det[N]`` if it would hit an input
        or an output already written in this run."""
        try:
            rel = src.resolve().relative_to(root.resolve())
        except ValueError:
            rel = Path(src.name)
        base = self.out_dir / sub if sub else self.out_dir
        cand = base / rel
        n = 0
        while cand.resolve() in self.inputs or cand.resolve() in self.used:
            n += 1
            cand = base / rel.with_name(f"{rel.stem}_det{'' if n == 1 else n}{rel.suffix}")
        self.used.add(cand.resolve())
        cand.parent.mkdir(parents=True, exist_ok=True)
        return cand


def _write_image(path: Path, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(path.suffix if path.suffix else ".jpg", image)
    if not ok:
        path = path.with_suffix(".png")
        ok, buf = cv2.imencode(".png", image)
    buf.tofile(str(path))


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
        self.failed: list[str] = []
        self.num_faces = 0

    def fail(self, msg: str) -> None:
        self.failed.append(msg)
        print(f"error: {msg} (skipped)", file=sys.stderr)

    def emit(self, record: dict[str, Any]) -> None:
        if self.json_out is not None:
            self.json_out.write(json.dumps(record) + "\n")
            self.json_out.flush()

    def save(self, src: Path, root: Path, image: np.ndarray, faces: list[Face]) -> None:
        if not self.args.no_draw:
            _write_image(self.outputs.path_for(src, root), draw_faces(image, faces, self.vis))
        if self.args.save_crops:
            shown = [f for f in faces if f.score >= self.vis]
            for i, crop in enumerate(align_faces(image, shown)):
                crop_src = src.with_name(f"{src.stem}_face{i:03d}.png")
                _write_image(self.outputs.path_for(crop_src, root, sub="crops"), crop)

    def images(self, items: list[tuple[Path, Path]], bar) -> None:
        bs = max(1, self.args.batch_size)
        for s in range(0, len(items), bs):
            chunk = []
            for src, root in items[s : s + bs]:
                try:
                    chunk.append((src, root, load_image(src)))
                except ImageError as e:
                    self.fail(str(e))
                    bar.update(1)
            if not chunk:
                continue
            results = self.det.detect_batch([img for _, _, img in chunk], **self.kw)
            for (src, root, img), faces in zip(chunk, results, strict=True):
                self.num_faces += len(faces)
                self.emit({"image": str(src), "faces": [f.to_dict() for f in faces]})
                self.save(src, root, img, faces)
                bar.update(1)

    def video(self, src: Path, root: Path) -> None:
        try:
            reader = VideoReader(src)
        except VideoError as e:
            self.fail(str(e))
            return
        writer = None
        try:
            if not self.args.no_draw:
                writer = open_writer(
                    self.outputs.path_for(src, root), reader.fps, reader.size, reader.fourcc
                )
            frames: list[np.ndarray] = []
            index = 0
            n_read = 0

            def flush():
                nonlocal index
                for frame, faces in zip(
                    frames, self.det.detect_batch(frames, **self.kw), strict=True
                ):
                    self.num_faces += len(faces)
                    self.emit(
                        {"image": str(src), "frame": index, "faces": [f.to_dict() for f in faces]}
                    )
                    if writer is not None:
                        writer.write(draw_faces(frame, faces, self.vis))
                    index += 1
                frames.clear()

            for frame in reader:
                n_read += 1
                frames.append(frame)
                if len(frames) >= max(1, self.args.batch_size):
                    flush()
            if frames:
                flush()
            if n_read == 0:
                self.fail(f"{src}: no frames could be read from the video")
        except VideoError as e:
            self.fail(str(e))
        finally:
            reader.close()
            if writer is not None:
                writer.release()


def main(argv: Sequence[str] | None = None, *, detector: Any = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 if any input failed, 2 usage error).

    ``detector`` injects a ready ``Detector`` (tests, embedding); otherwise one is built from
    ``--weights`` / ``--backbone`` and the size options.
    """
    from tqdm import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size <= 0:
        parser.error("--batch-size must be positive")
    if args.origin_size and args.max_size is not None:
        parser.error("--origin-size cannot be combined with --max-size")
    files, errors = collect_inputs(args.inputs)
    for msg in errors:
        print(f"error: {msg} (skipped)", file=sys.stderr)
    input_paths = [f for f, _ in files]
    json_path = None if args.json in (None, "-") else Path(args.json)
    if json_path is not None and json_path.resolve() in {p.resolve() for p in input_paths}:
        parser.error(f"--json {json_path} is one of the inputs; refusing to overwrite it")
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
        )
    args.output.mkdir(parents=True, exist_ok=True)
    json_out: IO[str] | None
    if args.json == "-":
        json_out = sys.stdout
    elif json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_out = open(json_path, "w", encoding="utf-8")  # noqa: SIM115
    else:
        json_out = None
    runner = _Runner(args, detector, json_out, _Outputs(args.output, input_paths))
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
    finally:
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
    failed = len(runner.failed) + len(errors)
    done = len(files) - len(runner.failed)
    print(
        f"{done} input(s) processed, {runner.num_faces} face(s) found, {failed} failed; "
        f"outputs in {args.output}",
        file=sys.stderr,
    )
    return 1 if failed else 0
