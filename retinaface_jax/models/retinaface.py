"""``RetinaFace``: backbone -> FPN -> three SSH context modules -> class / box / landmark heads.

Returns raw outputs for every prior: ``loc [B,P,4]``, ``conf [B,P,2]`` (logits; the original's
test phase applies softmax, ``jax.nn.softmax(conf, -1)`` here), ``landms [B,P,10]``. Priors are
ordered (level, row, column, anchor) as in the original.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retinaface_jax.config import RetinaFaceConfig, get_config
from retinaface_jax.models.layers import (
    SHAPES_ONLY,
    BatchNorm2d,
    Conv2d,
    Rngs,
    initialized_at_once,
)
from retinaface_jax.models.mean_subtraction import subtract_mean
from retinaface_jax.models.net import FPN, SSH, MobileNetV1
from retinaface_jax.models.resnet import ResNet50


class _Head(nnx.Module):
    """A 1x1 conv predicting ``width`` numbers per anchor, flattened to ``[B, H*W*A, width]``."""

    width: int = 0

    def __init__(self, inchannels: int = 512, num_anchors: int = 2, *, rngs: Rngs):
        self.conv1x1 = Conv2d(inchannels, num_anchors * self.width, 1, 1, 0, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.conv1x1(x)
        return out.reshape(out.shape[0], -1, self.width)


class ClassHead(_Head):
    """Face / background logits per anchor."""

    width = 2


class BboxHead(_Head):
    """Box offsets (encoded against the prior) per anchor."""

    width = 4


class LandmarkHead(_Head):
    """Five landmark offsets (encoded against the prior) per anchor."""

    width = 10


def _heads(cls: type[_Head], cfg: RetinaFaceConfig, rngs: Rngs) -> nnx.List:
    return nnx.List([cls(cfg.out_channel, cfg.anchor_num, rngs=rngs) for _ in cfg.steps])


class RetinaFace(nnx.Module):
    """The RetinaFace detector; attribute paths follow the original's state-dict names."""

    @initialized_at_once
    def __init__(self, cfg: RetinaFaceConfig | str = "mobilenet0.25", *, rngs: Rngs | None = None):
        cfg = get_config(cfg) if isinstance(cfg, str) else cfg
        self.cfg = cfg
        if cfg.backbone == "mobilenet0.25":
            self.body = MobileNetV1(rngs=rngs)
        else:
            self.body = ResNet50(rngs=rngs)
        c = cfg.in_channel
        self.fpn = FPN([c * 2, c * 4, c * 8], cfg.out_channel, rngs=rngs)
        self.ssh1 = SSH(cfg.out_channel, cfg.out_channel, rngs=rngs)
        self.ssh2 = SSH(cfg.out_channel, cfg.out_channel, rngs=rngs)
        self.ssh3 = SSH(cfg.out_channel, cfg.out_channel, rngs=rngs)
        self.ClassHead = _heads(ClassHead, cfg, rngs)
        self.BboxHead = _heads(BboxHead, cfg, rngs)
        self.LandmarkHead = _heads(LandmarkHead, cfg, rngs)
        for _, module in nnx.iter_modules(self):
            if isinstance(module, BatchNorm2d):
                module.momentum = cfg.bn_momentum

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [B,H,W,3]`` float32 BGR minus ``cfg.rgb_mean``, or uint8 BGR (the mean subtracted
        here, exactly as ``subtract_mean`` does) -> ``(loc, conf_logits, landms)``."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"RetinaFace input: expected [B,H,W,3] (NHWC, BGR), got {x.shape}")
        if x.dtype == jnp.uint8:
            x = subtract_mean(x, self.cfg.rgb_mean)
        fpn = self.fpn(self.body.features(x))
        features = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        bbox = jnp.concatenate([self.BboxHead[i](f) for i, f in enumerate(features)], axis=1)
        classes = jnp.concatenate([self.ClassHead[i](f) for i, f in enumerate(features)], axis=1)
        landms = jnp.concatenate([self.LandmarkHead[i](f) for i, f in enumerate(features)], axis=1)
        return bbox, classes, landms


def abstract_model(cfg: RetinaFaceConfig) -> RetinaFace:
    """A ``RetinaFace`` whose weights are shapes only (``jax.ShapeDtypeStruct``; no random init,
    nothing traced: instant to build). Every weight must be assigned before use; loading weights
    does exactly that."""
    model = RetinaFace(cfg, rngs=SHAPES_ONLY)  # (BatchNorm's constants are real: made shapes)
    state = nnx.state(model)
    nnx.update(model, jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state))
    return model
