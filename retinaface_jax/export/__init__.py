"""Export of the reference model for deployment: ONNX (the original export's interface, optional
int8) and StableHLO (``jax.export``) programs.

Needs the ``[export]`` extra (``pip install 'retinaface_jax[export]'``); the names here are
imported on first use, so importing this package imports neither onnx nor onnxruntime.
"""

from __future__ import annotations

from retinaface_jax.lazy_exports import lazy_exports

_EXPORTS = {
    "export_onnx": "retinaface_jax.export.onnx_export",
    "build_onnx": "retinaface_jax.export.onnx_export",
    "decode_onnx_outputs": "retinaface_jax.export.onnx_decode",
    "OnnxDetector": "retinaface_jax.export.onnx_decode",
    "quantize_int8": "retinaface_jax.export.quantize",
    "export_stablehlo": "retinaface_jax.export.stablehlo",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
