"""int8 static quantization of an exported ONNX model with onnxruntime's quantization tools.

Activation ranges are calibrated on real images preprocessed exactly as the export's input
(``onnx_decode.onnx_input``: the ``Detector``'s resize rule, mean removed, NCHW), one image per
calibration step, with the 99.999th percentile of each tensor's histogram (plain min/max lets
rare outliers coarsen the steps); weights are quantized per output channel. The stem stays in
float by default (``STEM``): it sees the raw input (a uint8 step of ~1 intensity level) and in
MobileNet0.25 its 8- and 16-channel layers have no redundancy to average rounding errors out;
quantizing it cost 0.02-0.03 AP on WIDER easy / medium, keeping it costs little speed. The QDQ
format keeps the float graph with QuantizeLinear / DequantizeLinear pairs, which onnxruntime fuses
into int8 kernels and other runtimes (TensorRT, OpenVINO) read as well.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from retinaface_jax.config import RetinaFaceConfig, get_config
from retinaface_jax.export.onnx_decode import onnx_input
from retinaface_jax.inference.preprocess import load_image, resize_factor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_CALIBRATION_IMAGES = 32
STEM = {  # node-name prefixes kept in float by default, per backbone
    "mobilenet0.25": ("/body.stage1.0.", "/body.stage1.1."),  # conv_bn(3, 8) and conv_dw(8, 16)
    "resnet50": ("/body.conv1/",),
}
HEAD_PREFIXES = ("/BboxHead", "/ClassHead", "/LandmarkHead", "/softmax")


def calibration_images(directory: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The images under ``directory`` (recursively, sorted), at most ``limit`` of them evenly
    spread over the sorted list (so several WIDER events are represented)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--calibration: not a directory: {root}")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"--calibration: no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    if limit is not None and len(paths) > limit:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]
    return paths


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds ``{"input": [1, 3, h, w]}`` for each image, preprocessed as the export's input."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        cfg: RetinaFaceConfig,
        target_size: int | None = None,
        max_size: int | None = None,
    ):
        self.paths, self.cfg = list(paths), cfg
        self.target_size, self.max_size = target_size, max_size
        self._next, self._end = 0, len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Feed only images ``start_index:end_index`` (onnxruntime's strided calibration)."""
        self._next, self._end = start_index, min(end_index, len(self.paths))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        img = load_image(self.paths[self._next])
        self._next += 1
        resize = resize_factor(img.shape[0], img.shape[1], self.target_size, self.max_size)
        return {"input": onnx_input(img, self.cfg, resize)}

    def rewind(self) -> None:
        self._next, self._end = 0, len(self.paths)


def quantize_int8(
    float_model: str | os.PathLike,
    out_path: str | os.PathLike,
    calibration: str | os.PathLike,
    *,
    cfg: RetinaFaceConfig | str = "mobilenet0.25",
    limit: int | None = DEFAULT_CALIBRATION_IMAGES,
    per_channel: bool = True,
    exclude_heads: bool = False,
    exclude: Sequence[str] | None = None,
    op_types: Sequence[str] | None = None,
    method: str = "percentile",
    quant_format: str = "qdq",
    target_size: int | None = None,
    max_size: int | None = None,
) -> Path:
    """Write the int8 (static, calibrated on images in ``calibration``) version of the float
    ONNX model ``float_model`` to ``out_path``; returns ``out_path``.

    ``quant_format``: ``'qdq'`` (QuantizeLinear/DequantizeLinear around float operators) or
    ``'qoperator'`` (QLinearConv ...). ``exclude``: node-name prefixes kept in float (default
    ``STEM[cfg.backbone]``; ``()`` quantizes everything); ``exclude_heads`` also keeps the heads
    and softmax in float; ``op_types``: the operator types to quantize (default: all that
    onnxruntime supports). ``method``: activation range calibration, ``'percentile'``,
    ``'minmax'`` or ``'entropy'``.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    if quant_format not in formats:
        raise ValueError(f"quant_format: expected one of {sorted(formats)}, got {quant_format!r}")
    src = Path(float_model)
    if not src.is_file():
        raise FileNotFoundError(f"float ONNX model not found: {src}")
    paths = calibration_images(calibration, limit)
    model = onnx.load(str(src))
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise ValueError(f"method: expected one of {sorted(methods)}, got {method!r}")
    if exclude is None:
        exclude = STEM.get(cfg.backbone, ())
    skip = tuple(exclude) + (HEAD_PREFIXES if exclude_heads else ())
    excluded = [n.name for n in model.graph.node if skip and n.name.startswith(skip)]
    out = Path(out_path)
    # onnxruntime's tool logs advice ("consider pre-processing") on the root logger: quiet it
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:  # (the histogram calibrators print progress on stdout: captured)
        with (
            tempfile.TemporaryDirectory(prefix="retinaface_quant_") as tmp,
            contextlib.redirect_stdout(io.StringIO()),
        ):
            # the calibration tool writes an augmented copy next to the model: a private dir
            staged = Path(tmp) / "float.onnx"
            onnx.save_model(model, str(staged))
            quantize_static(
                str(staged),
                str(out),
                ImageCalibrationReader(paths, cfg, target_size, max_size),
                quant_format=formats[quant_format],
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                nodes_to_exclude=excluded,
                op_types_to_quantize=None if op_types is None else list(op_types),
                calibrate_method=methods[method],
                # one image per calibration step: images of different sizes (the histogram
                # methods stack a step's tensors) and bounded memory. Not
                # CalibMaxIntermediateOutputs: onnxruntime 1.32 drops what it collected when
                # that limit is reached instead of folding it into the ranges.
                extra_options={"CalibTensorRangeSymmetric": False, "CalibStridedMinMax": 1},
            )
    finally:
        root.setLevel(level)
    return out
