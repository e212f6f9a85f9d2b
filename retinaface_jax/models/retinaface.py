"""``RetinaFace``: backbone -> FPN -> three SSH context modules -> class / box / landmark heads.

Returns raw outputs for every prior: ``loc [B,P,4]``, ``conf [B,P,2]`` (logits; the original's
test phase applies softmax, ``jax.nn.softmax(conf, -1)`` here), ``landms [B,P,10]``. Priors are
ordered (level, row, column, anchor) as in the original.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.backends.native import native_training
from retinaface_jax.backends.xla_cpu.conv_ops import ImageWithMean, conv2d
from retinaface_jax.config import RetinaFaceConfig, get_config
from retinaface_jax.models.layers import (
    BatchNorm2d,
    Conv2d,
    abstract_init,
    add_bias,
    initialized_at_once,
)
from retinaface_jax.models.net import FPN, SSH, MobileNetV1
from retinaface_jax.models.resnet import ResNet50


class _Head(nnx.Module):
    """A 1x1 conv predicting ``width`` numbers per anchor, flattened to ``[B, H*W*A, width]``."""

    width: int = 0

    def __init__(self, inchannels: int = 512, num_anchors: int = 2, *, rngs: nnx.Rngs):
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


def _heads(cls: type[_Head], cfg: RetinaFaceConfig, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([cls(cfg.out_channel, cfg.anchor_num, rngs=rngs) for _ in cfg.steps])


class RetinaFace(nnx.Module):
    """The RetinaFace detector; attribute paths follow the original's state-dict names."""

    @initialized_at_once
    def __init__(
        self, cfg: RetinaFaceConfig | str = "mobilenet0.25", *, rngs: nnx.Rngs | None = None
    ):
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
        if x.dtype == jnp.uint8:  # inside a native CPU train step the stem reads it as it is
            x = ImageWithMean(x, tuple(self.cfg.rgb_mean))
            x = x if native_training.active() else x.materialize()
        fpn = self.fpn(self.body.features(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        heads = (self.BboxHead, self.ClassHead, self.LandmarkHead)
        levels = [_level_heads([h[i] for h in heads], f) for i, f in enumerate(feats)]
        return tuple(jnp.concatenate([out[k] for out in levels], axis=1) for k in range(len(heads)))


def _level_heads(heads: list[_Head], x: jax.Array) -> list[jax.Array]:
    """One pyramid level's 1x1 heads as one layer: their kernels and biases side by side, so the
    level's features are read once (and once per gradient) instead of once per head. Each head's
    output ``[B, H*W*A, width]`` is its slice of the channels."""
    convs = [h.conv1x1 for h in heads]
    kernel = jnp.concatenate([c.kernel[...] for c in convs], axis=-1)
    y = add_bias(conv2d(x, kernel, 1, 0, 1), jnp.concatenate([c.bias[...] for c in convs]))
    cuts = np.cumsum([c.out_channels for c in convs])[:-1].tolist()
    parts = jnp.split(y, cuts, axis=-1)  # its transpose is one concatenation, not pads and adds
    return [p.reshape(p.shape[0], -1, h.width) for p, h in zip(parts, heads)]


def abstract_model(cfg: RetinaFaceConfig) -> RetinaFace:
    """A ``RetinaFace`` whose variables are shapes only (``jax.ShapeDtypeStruct``; no random init,
    nothing traced: instant to build). Every variable must be assigned before use; loading
    weights does exactly that."""
    with abstract_init():
        return RetinaFace(cfg)
