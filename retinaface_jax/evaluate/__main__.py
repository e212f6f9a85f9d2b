"""``python -m retinaface_jax.evaluate widerface|fddb ...``: detector + official protocol in one
command (see ``--help`` of each sub-command).

User errors (missing directories, bad files, bad option values) are one ``PROG: error: ...`` line
on stderr and exit status 2 (argparse's own usage errors too); the traceback only with
``--debug`` or ``RETINAFACE_DEBUG=1`` (``retinaface_jax.cli_errors``).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from retinaface_jax.backends.native.build import KERNEL_CHOICES
from retinaface_jax.cli_errors import add_debug_flag, run_cli
from retinaface_jax.evaluate import fddb, run
from retinaface_jax.evaluate.fddb import (
    fddb_discrete_roc,
    format_roc,
    read_fddb_detections,
    read_fddb_folds,
)
from retinaface_jax.evaluate.plot import plot_pr_curves, plot_roc, require_matplotlib
from retinaface_jax.evaluate.predictions_io import read_predictions
from retinaface_jax.evaluate.widerface_ap import PROTOCOL, WiderFaceEvaluation, evaluate_widerface
from retinaface_jax.evaluate.widerface_gt import SETTINGS, load_widerface_gt

PROG = "python -m retinaface_jax.evaluate"

FDDB_PROTOCOL = (
    "FDDB, our discrete ROC (not the official ellipse-overlap tool): per image, by descending "
    "score, a detection is a true positive when its highest-IoU face (ellipse bounding box) has "
    "IoU >= 0.5 and was not taken by a higher-scoring detection"
)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1] (score and IoU thresholds)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _add_detector_args(p: argparse.ArgumentParser, default_batch: int = 4) -> None:
    add_debug_flag(p)
    g = p.add_argument_group("detector")
    g.add_argument(
        "--weights",
        help="original .pth / native checkpoint (default: official weights of --network)",
    )
    g.add_argument("--network", default="mobilenet0.25", help="mobilenet0.25 or resnet50")
    g.add_argument(
        "--conf-threshold", type=_fraction, default=None, help="score threshold (config: 0.02)"
    )
    g.add_argument("--nms-threshold", type=_fraction, default=None, help="NMS IoU (config: 0.4)")
    g.add_argument("--batch-size", type=_positive_int, default=default_batch)
    g.add_argument(
        "--kernels",
        choices=KERNEL_CHOICES,
        default="auto",
        help="what runs the network: auto (native CPU kernels when usable, else XLA), native, xla",
    )
    g.add_argument("--overwrite", action="store_true", help="replace existing prediction files")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate RetinaFace on WIDER FACE val (official AP) or FDDB.",
    )
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser(
        "widerface",
        help="WIDER FACE val: detect, write per-image txt files, official easy/medium/hard AP",
        description="With --images: run the detector over <images>/<event>/*.jpg, write "
        "<pred-dir>/<event>/<image>.txt and evaluate them. Without --images: evaluate the "
        "existing files in --pred-dir.",
    )
    w.add_argument("--images", type=Path, help="val images dir (<event>/<image>.jpg)")
    w.add_argument(
        "--gt",
        type=Path,
        required=True,
        help="dir with wider_face_val.mat and wider_{easy,medium,hard}_val.mat",
    )
    w.add_argument(
        "--pred-dir", type=Path, help="prediction txt dir (default with --images: ./widerface_txt)"
    )
    scale = w.add_mutually_exclusive_group()
    scale.add_argument("--origin-size", action="store_true", help="original image scale (default)")
    scale.add_argument(
        "--target-size", type=_positive_int, help="short side target, e.g. 1600 (with --max-size)"
    )
    w.add_argument("--max-size", type=_positive_int, help="long side cap, e.g. 2150")
    w.add_argument(
        "--plot", type=Path, help="write the three precision-recall curves to this image"
    )
    _add_detector_args(w)

    f = sub.add_parser(
        "fddb",
        help="FDDB: detect, write the detection file like test_fddb.py, our discrete ROC",
        description=fddb.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--images", type=Path, help="FDDB images dir (<2002/08/11/big/img_591>.jpg)")
    f.add_argument(
        "--folds", type=Path, required=True, help="FDDB-folds dir (FDDB-fold-XX-ellipseList.txt)"
    )
    f.add_argument(
        "--fold", type=_positive_int, action="append", help="fold number(s) to use (default: all)"
    )
    f.add_argument(
        "--out", type=Path, default=Path("fddb_eval"), help="output dir (default ./fddb_eval)"
    )
    f.add_argument(
        "--dets", type=Path, help="evaluate this existing detection file instead of detecting"
    )
    f.add_argument("--plot", type=Path, help="write the discrete ROC to this image")
    _add_detector_args(f)
    return parser


def _detector_protocol(args: argparse.Namespace, detector: object) -> tuple[str, float, float]:
    """(description of the detection protocol, score threshold, NMS threshold)."""
    cfg = getattr(detector, "cfg", None)
    conf = (
        args.conf_threshold
        if args.conf_threshold is not None
        else getattr(cfg, "conf_threshold", 0.02)
    )
    nms = (
        args.nms_threshold if args.nms_threshold is not None else getattr(cfg, "nms_threshold", 0.4)
    )
    size = getattr(args, "target_size", None)
    scale = (
        f"target size {size}, max size {args.max_size}"
        if size
        else (
            f"max size {args.max_size}"
            if getattr(args, "max_size", None)
            else "original image size"
        )
    )
    text = f"{args.weights or args.network}, {scale}, score > {conf}, NMS {nms}, no top-k limits"
    return text, conf, nms


def _load(args: argparse.Namespace) -> tuple[object, str, float, float]:
    target = getattr(args, "target_size", None)
    max_size = getattr(args, "max_size", None)
    if max_size and not target and getattr(args, "origin_size", False):
        raise ValueError("--max-size cannot be combined with --origin-size")
    detector = run.load_detector(
        args.weights, args.network, target, max_size, kernels=getattr(args, "kernels", "auto")
    )
    text, conf, nms = _detector_protocol(args, detector)
    return detector, text, conf, nms


def _detect(args: argparse.Namespace, job: Callable, images: dict, target: Path) -> Any:
    """Load the detector and run ``job`` (``run.detect_widerface`` / ``run.detect_fddb``) with the
    command-line options, printing the protocol, the time and the failed images."""
    detector, text, conf, nms = _load(args)
    print(f"detector: {text}")
    t0 = time.perf_counter()
    out = job(
        detector,
        images,
        target,
        conf_threshold=conf,
        nms_threshold=nms,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - t0
    print(
        f"detection: {len(images)} images in {seconds:.1f} s ({seconds / len(images):.2f} s/image)"
    )
    failed = out[1] if isinstance(out, tuple) else out
    if failed:
        print(f"{len(failed)} image(s) failed and are not evaluated: {failed[:5]}")
    return out


def cmd_widerface(args: argparse.Namespace) -> int:
    if args.images is None and args.pred_dir is None:
        raise ValueError(
            "widerface: give --images (run the detector) and/or --pred-dir (existing files)"
        )
    if args.plot:
        require_matplotlib()
    t0 = time.perf_counter()
    gt = load_widerface_gt(args.gt)
    load_seconds = time.perf_counter() - t0
    if args.images is not None:
        pred_dir = args.pred_dir or Path("widerface_txt")
        images = run.widerface_jobs(args.images, gt, pred_dir, args.overwrite)
        written, failed = _detect(args, run.detect_widerface, images, pred_dir)
        print(f"wrote {len(written)} prediction files to {pred_dir}")
        source: Path | list[Path] = written
    else:
        source = args.pred_dir
    t0 = time.perf_counter()
    predictions = _read_predictions_reporting_warnings(source)
    load_seconds += time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # coverage and skipped settings: below
        result = evaluate_widerface(predictions, gt)
    print(f"protocol: {PROTOCOL}")
    print(
        result.coverage_message()
        + (" (partial set: not comparable with full-val AP)" if result.partial else "")
    )
    print("==================== Results ====================")
    for line in _ap_lines(result):
        print(line)
    print("=================================================")
    print(
        f"evaluation time: {load_seconds + result.seconds:.2f} s "
        f"(AP {result.seconds:.2f} s, reading GT and predictions {load_seconds:.2f} s)"
    )
    if not result.ap:
        raise ValueError(f"no WIDER FACE AP could be computed: {result.skipped_message()}")
    if args.plot:
        print(f"wrote PR curves to {plot_pr_curves(result, args.plot)}")
    return 0


def _read_predictions_reporting_warnings(source: Path | list[Path]) -> dict:
    """``read_predictions`` with its warnings (negative box sizes) as one stderr line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        predictions = read_predictions(source)
    for w in caught:
        print(f"{PROG}: warning: {w.message}", file=sys.stderr)
    return predictions


def _ap_lines(result: WiderFaceEvaluation) -> list[str]:
    """``Easy   Val AP: 0.93763254`` per setting, or why that setting was skipped (never nan)."""
    lines = []
    for s in SETTINGS:
        label = f"{s.capitalize():<6} Val AP:"
        if s in result.ap:
            lines.append(f"{label} {result.ap[s]:.8f}")
        else:
            lines.append(f"{label} skipped ({result.skipped[s]})")
    return lines


def cmd_fddb(args: argparse.Namespace) -> int:
    if args.plot:
        require_matplotlib()
    ellipses = read_fddb_folds(args.folds, args.fold)
    if args.dets is not None:
        dets_file = args.dets
    else:
        if args.images is None:
            raise ValueError("fddb: give --images (run the detector) or --dets (existing file)")
        images, missing = run.list_fddb_images(args.images, list(ellipses))
        print(
            f"{len(images)} of {len(ellipses)} annotated images present in {args.images}"
            + (f" ({missing} missing, not evaluated)" if missing else "")
        )
        if not images:
            raise FileNotFoundError(f"no annotated FDDB image found under {args.images}")
        dets_file = args.out / "FDDB_dets.txt"
        if dets_file.exists() and not args.overwrite:
            raise FileExistsError(f"{dets_file} already exists; use another --out or --overwrite")
        _detect(args, run.detect_fddb, images, dets_file)
        print(f"wrote {dets_file}")
    t0 = time.perf_counter()
    roc = fddb_discrete_roc(read_fddb_detections(dets_file), ellipses)
    roc_file = args.out / "DiscROC_ours.txt"
    args.out.mkdir(parents=True, exist_ok=True)
    roc_file.write_text(format_roc(roc))
    print(f"protocol: {FDDB_PROTOCOL}")
    print(f"evaluated {roc.num_images} images, {roc.num_faces} faces")
    for fp in (0, 10, 50, 100, 500, 1000):
        print(f"TPR at <= {fp:4d} false positives: {roc.tpr_at(fp):.4f}")
    print(f"wrote {roc_file} ({time.perf_counter() - t0:.2f} s)")
    if args.plot:
        print(f"wrote ROC to {plot_roc(roc, args.plot)}")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    """Parse and run one sub-command; user errors are raised (reported by :func:`main`)."""
    args = build_parser().parse_args(argv)
    return cmd_widerface(args) if args.command == "widerface" else cmd_fddb(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The command: one-line errors on stderr and exit status 2, tracebacks only with --debug."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
