"""ONNX export: onnxruntime speed of our export vs the original's (the anchor), int8 vs float,
and WIDER FACE AP of the float and int8 exports.

One process: the anchor, our float export (BatchNorm folded, the default), our export with
``BatchNormalization`` nodes (``fold_batchnorm=False``) and the int8 export (static QDQ,
calibrated on ``--calibration`` images, default the shared WIDER *train* images, so the val
images evaluated below are not seen) run on the same inputs (BGR minus mean, NCHW, float32) in
alternating blocks (``common.alternating_medians``) at each size and batch. Prints per-call
medians, ratios (ours / anchor, int8 / ours float) and the file sizes. Then (unless ``--no-ap``)
detects on the shared val subset at original scale with each export (``OnnxDetector``: our
priors, decode and NMS; score > 0.02, NMS 0.4, no top-k, as the original evaluation) and prints
the official AP easy / medium / hard.

    python benchmarks/export.py [--calls 20] [--sizes 640x480,1920x1080] [--batches 1,8]
                                [--calibration DIR] [--calibration-images 32] [--per-tensor]
                                [--exclude-heads] [--no-ap] [--ap-images N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from common import alternating_medians, machine, onnx_anchor, shared_dir, warm_up

from retinaface_jax import load_model
from retinaface_jax.export.onnx_decode import OnnxDetector
from retinaface_jax.export.onnx_export import export_onnx
from retinaface_jax.export.quantize import quantize_int8


def _session(path: Path):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s


def speed(args, paths: dict[str, Path], anchor_session) -> None:
    sessions = {"anchor": anchor_session} | {k: _session(p) for k, p in paths.items()}
    print(f"machine: {machine()}")
    print("file sizes: " + ", ".join(f"{k} {p.stat().st_size:,} B" for k, p in paths.items()))
    names = list(sessions)
    head = " ".join(f"{n + ' ms':>13}" for n in names)
    print(f"{'input':>16} {head} {'ours/anchor':>12} {'bn/anchor':>10} {'int8/ours':>10}")
    rng = np.random.default_rng(0)
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        for b in (int(v) for v in args.batches.split(",")):
            x = rng.uniform(0, 255, (b, 3, h, w)) - np.array([104, 117, 123])[:, None, None]
            x = x.astype(np.float32)
            fns = {n: (lambda s=s, x=x: s.run(None, {"input": x})) for n, s in sessions.items()}
            warm_up(fns, seconds=1.0, calls=2)
            calls = max(4, args.calls // b) if b > 1 else args.calls
            med = alternating_medians(fns, calls, block=max(2, min(5, calls // 4)))
            cells = " ".join(f"{med[n] * 1e3:13.1f}" for n in names)
            print(
                f"{f'{w}x{h} b{b}':>16} {cells} {med['ours'] / med['anchor']:12.3f} "
                f"{med['ours_bn'] / med['anchor']:10.3f} {med['int8'] / med['ours']:10.3f}",
                flush=True,
            )


def ap(args, paths: dict[str, Path], shared: Path) -> None:
    from retinaface_jax.evaluate.predictions_io import faces_to_rows
    from retinaface_jax.evaluate.run import detect_images, list_widerface_images
    from retinaface_jax.evaluate.widerface_ap import widerface_ap

    images = list_widerface_images(shared / "data/widerface/val/images")
    if args.ap_images:
        keys = list(images)[:: max(1, len(images) // args.ap_images)][: args.ap_images]
        images = {k: images[k] for k in keys}
    print(f"WIDER FACE val subset: {len(images)} images, original scale, score > 0.02, NMS 0.4")
    for name in args.ap_models.split(","):
        t0 = time.perf_counter()
        preds, failed = detect_images(
            OnnxDetector(paths[name]),
            images,
            faces_to_rows,
            conf_threshold=0.02,
            nms_threshold=0.4,
            progress=False,
        )
        seconds = time.perf_counter() - t0
        result = widerface_ap(preds, shared / "data/widerface/gt")
        cells = ", ".join(f"{k} {v:.6f}" for k, v in result.items())
        print(f"{name:>5}: AP {cells} ({seconds:.0f} s, {len(failed)} failed)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=20, help="timed calls per side at batch 1")
    p.add_argument("--sizes", default="640x480,1920x1080", help="WxH list")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--calibration", type=Path, default=None)
    p.add_argument("--calibration-images", type=int, default=32)
    p.add_argument("--per-tensor", action="store_true")
    p.add_argument("--exclude-heads", action="store_true")
    p.add_argument("--quant-format", default="qdq", choices=["qdq", "qoperator"])
    p.add_argument("--method", default="percentile", choices=["percentile", "minmax", "entropy"])
    p.add_argument(
        "--float-nodes", action="append", default=None, help="'none': quantize the stem too"
    )
    p.add_argument("--no-ap", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--ap-models", default="ours,int8", help="which exports to evaluate")
    p.add_argument("--ap-images", type=int, default=None, help="evaluate only N val images")
    args = p.parse_args()
    shared = shared_dir()
    model = load_model(shared / "data/weights/mobilenet0.25_Final.pth")
    anchor_session, _ = onnx_anchor(shared)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        paths = {
            "ours": Path(tmp) / "retinaface.onnx",
            "ours_bn": Path(tmp) / "retinaface_bn.onnx",
            "int8": Path(tmp) / "retinaface_int8.onnx",
        }
        export_onnx(model, paths["ours"])
        export_onnx(model, paths["ours_bn"], fold_batchnorm=False)
        t0 = time.perf_counter()
        quantize_int8(
            paths["ours"],
            paths["int8"],
            args.calibration or shared / "data/widerface/train/images",
            limit=args.calibration_images,
            per_channel=not args.per_tensor,
            exclude_heads=args.exclude_heads,
            exclude=None
            if args.float_nodes is None
            else tuple(p for p in args.float_nodes if p != "none"),
            method=args.method,
            quant_format=args.quant_format,
        )
        print(
            f"int8: {args.quant_format}, {args.method} calibration, "
            f"{'per-tensor' if args.per_tensor else 'per-channel'} weights, float nodes "
            f"{args.float_nodes or 'stem (default)'}, heads {'float' if args.exclude_heads else 'int8'}, "
            f"{args.calibration_images} calibration images, {time.perf_counter() - t0:.0f} s"
        )
        anchor_path = shared / "anchors/retinaface_mobilenet0.25_reference.onnx"
        print(f"anchor file: {anchor_path.stat().st_size:,} B")
        if not args.no_speed:
            speed(args, paths, anchor_session)
        if not args.no_ap:
            ap(args, paths, shared)


if __name__ == "__main__":
    main()
