"""Detections from an exported ONNX model (ours or the original's): our priors, decoding and NMS.

The recipe, for one image::

    import onnxruntime as ort
    from retinaface_jax.export import OnnxDetector, decode_onnx_outputs

    faces = OnnxDetector("retinaface.onnx").detect("photo.jpg")  # list[Face], as Detector.detect

    # or step by step (x: float32 [N, 3, H, W], BGR minus (104, 117, 123); resize: see below)
    session = ort.InferenceSession("retinaface.onnx", providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": x})  # loc, conf (probabilities), landms
    rows = decode_onnx_outputs(outputs, (H, W))  # per image [K, 15]: x1 y1 x2 y2 score landmarks

It is the ``Detector``'s post-processing on the network's outputs: score ``> conf_threshold``,
the ``top_k`` best (ties: lower prior index first), boxes and landmarks decoded against
``prior_box`` in pixels and divided by the resize factor, the original's greedy ``+1``-pixel NMS
(``inference.postprocess.nms_rows``, jitted; candidates padded to a power of two so that few
programs are compiled), then ``keep_top_k``.
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from retinaface_jax.box_utils import decode, decode_landm
from retinaface_jax.config import RetinaFaceConfig, from_dict, get_config
from retinaface_jax.inference.face import Face
from retinaface_jax.inference.postprocess import nms_rows, pixel_priors
from retinaface_jax.inference.preprocess import (
    ImageInput,
    load_image,
    resize_factor,
    resize_image,
    subtract_mean,
)

_UNSET: Any = object()
MIN_CANDIDATES = 64  # smallest padded candidate count (one compiled NMS program per power of 2)


def onnx_input(image: np.ndarray, cfg: RetinaFaceConfig, resize: float = 1.0) -> np.ndarray:
    """A BGR image ``[h, w, 3]`` -> the exported model's input ``[1, 3, h', w']`` float32: resized
    like the original (``resize``), mean removed, NCHW (the ``Detector``'s preprocessing)."""
    x = subtract_mean(resize_image(image, resize), cfg.rgb_mean)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


@functools.partial(jax.jit, static_argnames=("variances", "max_keep"))
def _decode_nms(scores, loc, landms, priors, resize, nms_threshold, *, variances, max_keep):
    """Decode sorted, padded candidates (``-inf`` score = none) and run the original's NMS."""
    boxes = decode(loc, priors, variances) / resize
    lm = decode_landm(landms, priors, variances) / resize
    return nms_rows(scores, boxes, lm, nms_threshold, max_keep)


def _padded_size(n: int) -> int:
    return max(MIN_CANDIDATES, 1 << max(n - 1, 0).bit_length())


def decode_onnx_outputs(
    outputs: Sequence[np.ndarray],
    input_hw: tuple[int, int],
    cfg: RetinaFaceConfig | str = "mobilenet0.25",
    *,
    resize: float | Sequence[float] = 1.0,
    conf_threshold: float | None = None,
    nms_threshold: float | None = None,
    top_k: int | None = _UNSET,
    keep_top_k: int | None = _UNSET,
) -> list[np.ndarray]:
    """``(loc, conf, landms)`` of an exported model for inputs of size ``input_hw`` -> per image
    the detection rows ``[K, 15]`` (``x1 y1 x2 y2 score`` + five landmark points, in pixels of
    the image before ``resize``), highest score first: the ``Detector``'s detections.

    Thresholds and limits default to the config's (0.02, 0.4, 5000, 750); ``None`` for ``top_k``
    / ``keep_top_k`` means no limit. ``resize``: one factor, or one per image.
    """
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    loc, conf, landms = (np.asarray(a, dtype=np.float32) for a in outputs)
    h, w = (int(v) for v in input_hw)
    priors = pixel_priors(cfg, h, w)[0]
    if loc.shape[1] != priors.shape[0] or conf.shape[:2] != loc.shape[:2]:
        raise ValueError(
            f"outputs: {loc.shape[1]} priors in loc, conf {conf.shape}, but an input of "
            f"{h}x{w} has {priors.shape[0]}: give the size the model was run on"
        )
    conf_t = np.float32(cfg.conf_threshold if conf_threshold is None else conf_threshold)
    nms_t = np.float32(cfg.nms_threshold if nms_threshold is None else nms_threshold)
    top_k = cfg.top_k if top_k is _UNSET else top_k
    keep_top_k = cfg.keep_top_k if keep_top_k is _UNSET else keep_top_k
    factors = np.broadcast_to(np.asarray(resize, dtype=np.float32), (loc.shape[0],))
    rows = []
    for b in range(loc.shape[0]):
        scores = conf[b, :, 1]
        cand = np.flatnonzero(scores > conf_t)
        order = cand[np.argsort(-scores[cand], kind="stable")][:top_k]
        n, k = len(order), _padded_size(len(order))
        s = np.full((1, k), -np.inf, np.float32)
        s[0, :n] = scores[order]
        pad = [(0, 0), (0, k - n), (0, 0)]
        out, count = _decode_nms(
            jnp.asarray(s),
            jnp.asarray(np.pad(loc[b : b + 1, order], pad)),
            jnp.asarray(np.pad(landms[b : b + 1, order], pad)),
            jnp.asarray(np.pad(priors[order], pad[1:])),
            jnp.float32(factors[b]),
            jnp.float32(nms_t),
            variances=tuple(cfg.variance),
            max_keep=k if keep_top_k is None else min(int(keep_top_k), k),
        )
        rows.append(np.asarray(out[0, : int(count[0])]))
    return rows


def _config_of(session: Any) -> RetinaFaceConfig:
    """The config written into the model's metadata by ``export_onnx``; else (e.g. the
    original's export) the MobileNet0.25 preset."""
    props = session.get_modelmeta().custom_metadata_map
    text = props.get("retinaface_jax.config")
    if text:
        return from_dict(tomllib.loads(text), "ONNX metadata")
    return get_config(props.get("backbone", "mobilenet0.25"))


class OnnxDetector:
    """``Detector.detect`` / ``detect_batch`` on an exported ONNX model with onnxruntime.

    ``model``: a path or an ``onnxruntime.InferenceSession``. ``target_size`` / ``max_size``:
    the ``Detector``'s resize options. Images run one at a time at their own size.
    """

    def __init__(
        self,
        model: str | os.PathLike | Any,
        cfg: RetinaFaceConfig | str | None = None,
        *,
        target_size: int | None = None,
        max_size: int | None = None,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        if isinstance(model, str | os.PathLike):
            if not os.path.isfile(model):
                raise FileNotFoundError(f"ONNX model not found: {model}")
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            model = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.session = model
        self.cfg = get_config(cfg) if isinstance(cfg, str) else cfg or _config_of(model)
        resize_factor(100, 100, target_size, max_size)  # validates the options
        self.target_size, self.max_size = target_size, max_size

    def detect(self, image: ImageInput, **options: Any) -> list[Face]:
        """Faces in one image (path or BGR array), highest score first; options as
        :func:`decode_onnx_outputs` (``conf_threshold``, ``nms_threshold``, ``top_k``,
        ``keep_top_k``)."""
        return self.detect_batch([image], **options)[0]

    def detect_batch(self, images: Sequence[ImageInput], **options: Any) -> list[list[Face]]:
        """:meth:`detect` for each image."""
        out = []
        for image in images:
            img = load_image(image)
            resize = resize_factor(img.shape[0], img.shape[1], self.target_size, self.max_size)
            x = onnx_input(img, self.cfg, resize)
            outputs = self.session.run(None, {"input": x})
            rows = decode_onnx_outputs(outputs, x.shape[2:], self.cfg, resize=resize, **options)
            out.append(Face.from_rows(rows[0]))
        return out
