"""A tiny stand-in RetinaFace (same call signature and output layout) for detection tests.

Each FPN level averages the input over its stride x stride cells (zeros beyond the image, like a
padded convolution), then a fixed linear map gives (loc, conf logits, landmarks) for two anchors per
cell in the original order (level, row, column, anchor). Cells depend only on their own pixels, so
padding the input never changes the valid cells: the detection plumbing can be tested exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.config import get_config


class FakeRetinaFace(nnx.Module):
    """``model(x [B,H,W,3]) -> (loc [B,P,4], conf [B,P,2], landms [B,P,10])``."""

    def __init__(self, cfg=None, seed: int = 0):
        self.cfg = cfg or get_config("mobilenet0.25")
        rng = np.random.default_rng(seed)
        n = self.cfg.anchor_num
        self.w = nnx.Param(jnp.asarray(rng.normal(0, 0.02, (3, n * 16)), jnp.float32))
        self.b = nnx.Param(jnp.asarray(rng.normal(0, 0.5, (n * 16,)), jnp.float32))
        self.training = False

    def eval(self):
        self.training = False

    def __call__(self, x):
        b, h, w, _ = x.shape
        n = self.cfg.anchor_num
        locs, confs, lms = [], [], []
        for s in self.cfg.steps:
            hh, ww = -(-h // s), -(-w // s)
            xp = jnp.pad(x, ((0, 0), (0, hh * s - h), (0, ww * s - w), (0, 0)))
            f = xp.reshape(b, hh, s, ww, s, 3).mean(axis=(2, 4))
            y = (f @ self.w[...] + self.b[...]).reshape(b, hh * ww * n, 16)
            locs.append(jnp.tanh(y[..., :4]))
            confs.append(y[..., 4:6] * 4.0)
            lms.append(jnp.tanh(y[..., 6:16]))
        return (
            jnp.concatenate(locs, 1),
            jnp.concatenate(confs, 1),
            jnp.concatenate(lms, 1),
        )


def reference_postprocess(
    loc,
    conf_softmax,
    landms,
    priors,
    cfg,
    resize=1.0,
    height=None,
    width=None,
    conf=0.02,
    nms_thr=0.4,
    top_k=5000,
    keep_top_k=750,
):
    """The original detect.py post-processing written out directly in numpy (test oracle)."""
    v0, v1 = cfg.variance
    loc, landms, priors = (np.asarray(a, np.float32) for a in (loc, landms, priors))
    boxes = np.concatenate(
        [priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:], priors[:, 2:] * np.exp(loc[:, 2:] * v1)],
        1,
    )
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    scale = np.array([width, height, width, height], np.float32)
    boxes = boxes * scale / resize
    lm = np.concatenate(
        [priors[:, :2] + landms[:, 2 * i : 2 * i + 2] * v0 * priors[:, 2:] for i in range(5)], 1
    )
    lm = lm * np.array([width, height] * 5, np.float32) / resize
    scores = np.asarray(conf_softmax)[:, 1]
    inds = np.where(scores > conf)[0]
    boxes, lm, scores = boxes[inds], lm[inds], scores[inds]
    order = scores.argsort()[::-1]
    if top_k is not None:
        order = order[:top_k]
    boxes, lm, scores = boxes[order], lm[order], scores[order]
    dets = np.hstack((boxes, scores[:, None])).astype(np.float32)
    x1, y1, x2, y2, sc = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = sc.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        ww = np.maximum(0.0, xx2 - xx1 + 1)
        hh = np.maximum(0.0, yy2 - yy1 + 1)
        inter = ww * hh
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= nms_thr)[0] + 1]
    dets, lm = dets[keep], lm[keep]
    if keep_top_k is not None:
        dets, lm = dets[:keep_top_k], lm[:keep_top_k]
    return np.concatenate([dets, lm], 1)


def fake_detector(**kwargs):
    """A ``Detector`` around :class:`FakeRetinaFace` (compilation cache off in tests)."""
    from retinaface_jax.inference.detector import Detector

    return Detector(FakeRetinaFace(), compilation_cache=False, **kwargs)


def softmax(x):
    return np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))
