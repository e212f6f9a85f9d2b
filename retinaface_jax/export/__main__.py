"""``python -m retinaface_jax.export {onnx,stablehlo} OUT ...``: export the reference model.

``onnx``: the original export's interface (``export_onnx``), optionally int8 (``--quantize int8
--calibration DIR``). ``stablehlo``: the whole detection program as ``jax.export`` bytecode
(``export_stablehlo``). Errors are one line on stderr (``--debug`` for the traceback); without
the ``[export]`` extra the command says what to install.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from retinaface_jax.cli_errors import add_debug_flag, run_cli

PROG = "python -m retinaface_jax.export"
INSTALL_HINT = "pip install 'retinaface_jax[export]'"


class MissingDependencyError(RuntimeError):
    """An optional dependency of the export is not installed."""


def require(module: str, what: str) -> None:
    """Import ``module`` or raise one line naming it and the extra to install."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{what} needs the '{module}' package, which is not installed ({e.msg}): {INSTALL_HINT}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _sizes(text: str) -> list[tuple[int, int]] | str:
    """``'480x640,1080x1920'`` -> ``[(480, 640), (1080, 1920)]`` (H x W); ``'any'`` stays."""
    if text.strip().lower() == "any":
        return "any"
    out = []
    for part in text.split(","):
        h, sep, w = part.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) <= 0 or int(w) <= 0:
            raise argparse.ArgumentTypeError(f"expected HxW[,HxW...] (e.g. 480x640), got {text!r}")
        out.append((int(h), int(w)))
    return out


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights",
        default=None,
        help="checkpoint: original .pth/.tar file or native checkpoint directory "
        "(default: the official weights of --backbone, fetched and cached)",
    )
    p.add_argument(
        "--backbone",
        default=None,
        choices=["mobilenet0.25", "resnet50"],
        help="official model when --weights is not given (default mobilenet0.25); "
        "with --weights, the backbone of that file (default: inferred)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Export the reference RetinaFace model: ONNX with the original export's "
        "interface (optionally int8), or the whole detection program as StableHLO.",
    )
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    o = sub.add_parser(
        "onnx",
        help="ONNX with the original export's interface (input [N,3,H,W] BGR minus the mean; "
        "loc, conf (softmax), landms)",
    )
    o.add_argument("out", type=Path, help="output .onnx file")
    _add_model_args(o)
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17, at least 13)")
    o.add_argument(
        "--no-fold-batchnorm",
        action="store_true",
        help="write BatchNormalization nodes instead of folding them into the convolutions",
    )
    o.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="write an int8 model (static quantization, calibrated on --calibration images)",
    )
    o.add_argument("--calibration", type=Path, help="directory of calibration images (int8)")
    o.add_argument(
        "--calibration-images",
        type=_positive_int,
        default=None,
        help="use at most this many calibration images, evenly spread (default 32)",
    )
    o.add_argument(
        "--per-tensor",
        action="store_true",
        help="int8: one weight scale per tensor (default: per output channel)",
    )
    o.add_argument(
        "--exclude-heads", action="store_true", help="int8: keep the heads and softmax in float"
    )
    o.add_argument(
        "--calibration-method",
        choices=["percentile", "minmax", "entropy"],
        default="percentile",
        help="int8: activation range calibration (default percentile, 99.999th)",
    )
    o.add_argument(
        "--float-nodes",
        action="append",
        metavar="PREFIX",
        default=None,
        help="int8: keep nodes whose name starts with PREFIX in float (repeatable; default: "
        "the stem, e.g. /body.stage1.0. and /body.stage1.1. for mobilenet0.25; 'none' "
        "quantizes every node)",
    )
    o.add_argument(
        "--quant-format",
        choices=["qdq", "qoperator"],
        default="qdq",
        help="int8 graph format (default qdq)",
    )
    o.add_argument(
        "--keep-float",
        type=Path,
        default=None,
        help="int8: also keep the float model at this path",
    )
    o.set_defaults(run=cmd_onnx)

    s = sub.add_parser(
        "stablehlo", help="the whole detection program as jax.export bytecode (JAX serving)"
    )
    s.add_argument("out", type=Path, help="output file")
    _add_model_args(s)
    s.add_argument(
        "--platforms",
        default="cpu,cuda,tpu",
        help="comma-separated platforms to lower for (default cpu,cuda,tpu)",
    )
    s.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="input sizes HxW[,HxW...] to export one program each for, or 'any' (default): one "
        "program with symbolic H and W",
    )
    s.set_defaults(run=cmd_stablehlo)
    return parser


def _load_model(args: argparse.Namespace):
    from retinaface_jax.weights.cache import load_pretrained

    source = args.weights or args.backbone or "mobilenet0.25"
    model, _ = load_pretrained(source, backbone=args.backbone if args.weights else None)
    return model


def _float_nodes(prefixes: list[str] | None) -> tuple[str, ...] | None:
    """``--float-nodes`` values -> ``quantize_int8(exclude=...)`` (None: the default stem)."""
    if prefixes is None:
        return None
    return tuple(p for p in prefixes if p.lower() != "none")


def cmd_onnx(args: argparse.Namespace) -> int:
    require("onnx", "the ONNX export")
    if args.quantize:
        require("onnxruntime", "int8 quantization")
        if args.calibration is None:
            raise ValueError("--quantize int8 needs --calibration DIR (a directory of images)")
        if not args.calibration.is_dir():
            raise FileNotFoundError(f"--calibration: not a directory: {args.calibration}")
    elif args.calibration is not None or args.keep_float is not None or args.float_nodes:
        raise ValueError(
            "--calibration / --keep-float / --float-nodes apply only with --quantize int8"
        )
    if not args.out.parent.is_dir():
        raise FileNotFoundError(
            f"{args.out}: the output directory {args.out.parent} does not exist"
        )
    from retinaface_jax.export.onnx_export import DEFAULT_OPSET, export_onnx

    model = _load_model(args)
    options = {
        "opset": DEFAULT_OPSET if args.opset is None else args.opset,
        "fold_batchnorm": not args.no_fold_batchnorm,
    }
    if not args.quantize:
        export_onnx(model, args.out, **options)
        print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, {model.cfg.backbone})")
        return 0
    from retinaface_jax.export.quantize import DEFAULT_CALIBRATION_IMAGES, quantize_int8

    with tempfile.TemporaryDirectory(prefix="retinaface_export_") as tmp:
        float_path = args.keep_float or Path(tmp) / "float.onnx"
        export_onnx(model, float_path, **options)
        quantize_int8(
            float_path,
            args.out,
            args.calibration,
            cfg=model.cfg,
            limit=args.calibration_images or DEFAULT_CALIBRATION_IMAGES,
            per_channel=not args.per_tensor,
            exclude_heads=args.exclude_heads,
            exclude=_float_nodes(args.float_nodes),
            method=args.calibration_method,
            quant_format=args.quant_format,
        )
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, int8, {model.cfg.backbone})")
    return 0


def cmd_stablehlo(args: argparse.Namespace) -> int:
    from retinaface_jax.export.stablehlo import export_stablehlo

    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
    extra = {} if args.sizes is None else {"sizes": None if args.sizes == "any" else args.sizes}
    path = export_stablehlo(
        args.out,
        weights=args.weights,
        backbone=args.backbone or "mobilenet0.25",
        platforms=platforms,
        **extra,
    )
    print(f"wrote {path} (platforms: {', '.join(platforms)})")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
