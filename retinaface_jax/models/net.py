"""The original ``models/net.py`` in Flax NNX: conv blocks, ``SSH``, ``FPN`` and ``MobileNetV1``.

Block constructors return an ``nnx.Sequential`` with the same layer indices as the original's
``nn.Sequential`` (activations are parameter-free modules), so ``body.stage1.1.3.weight`` in a
torch state dict is ``body.stage1.layers[1].layers[3].kernel`` here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retinaface_jax.models.layers import (
    BatchNorm2d,
    Conv2d,
    LeakyReLU,
    Linear,
    Rngs,
    initialized_at_once,
)


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0, *, rngs: Rngs):
    """3x3 conv (padding 1, no bias) -> BatchNorm -> LeakyReLU(leaky)."""
    return nnx.Sequential(
        Conv2d(inp, oup, 3, stride, 1, bias=False, rngs=rngs), BatchNorm2d(oup), LeakyReLU(leaky)
    )


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1, *, rngs: Rngs):
    """3x3 conv (padding 1, no bias) -> BatchNorm."""
    return nnx.Sequential(Conv2d(inp, oup, 3, stride, 1, bias=False, rngs=rngs), BatchNorm2d(oup))


def conv_bn1X1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0, *, rngs: Rngs):
    """1x1 conv (no bias) -> BatchNorm -> LeakyReLU(leaky)."""
    return nnx.Sequential(
        Conv2d(inp, oup, 1, stride, 0, bias=False, rngs=rngs), BatchNorm2d(oup), LeakyReLU(leaky)
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1, *, rngs: Rngs):
    """Depthwise-separable block: 3x3 depthwise -> BN -> act -> 1x1 pointwise -> BN -> act."""
    return nnx.Sequential(
        Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False, rngs=rngs),
        BatchNorm2d(inp),
        LeakyReLU(leaky),
        Conv2d(inp, oup, 1, 1, 0, bias=False, rngs=rngs),
        BatchNorm2d(oup),
        LeakyReLU(leaky),
    )


def _context_slope(out_channels: int) -> float:
    """The original's rule for FPN/SSH: LeakyReLU(0.1) for narrow heads (<= 64), else ReLU."""
    return 0.1 if out_channels <= 64 else 0.0


class SSH(nnx.Module):
    """Single Stage Headless context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches."""

    @initialized_at_once
    def __init__(self, in_channel: int, out_channel: int, *, rngs: Rngs):
        if out_channel % 4:
            raise ValueError(f"SSH: out_channel must be divisible by 4, got {out_channel}")
        leaky = _context_slope(out_channel)
        q = out_channel // 4
        self.conv3X3 = conv_bn_no_relu(in_channel, out_channel // 2, 1, rngs=rngs)
        self.conv5X5_1 = conv_bn(in_channel, q, 1, leaky, rngs=rngs)
        self.conv5X5_2 = conv_bn_no_relu(q, q, 1, rngs=rngs)
        self.conv7X7_2 = conv_bn(q, q, 1, leaky, rngs=rngs)
        self.conv7x7_3 = conv_bn_no_relu(q, q, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        conv3x3 = self.conv3X3(x)
        conv5x5_1 = self.conv5X5_1(x)
        conv5x5 = self.conv5X5_2(conv5x5_1)
        conv7x7_2 = self.conv7X7_2(conv5x5_1)
        conv7x7 = self.conv7x7_3(conv7x7_2)
        return jax.nn.relu(jnp.concatenate([conv3x3, conv5x5, conv7x7], -1))


def nearest_index(n_in: int, n_out: int) -> jax.Array:
    """Source index of each of ``n_out`` outputs in torch's nearest resize of ``n_in``:
    ``floor(dst * (n_in / n_out))`` with the scale in float32, as torch computes it (so odd sizes
    map exactly as in the original). In ``jnp``, so sizes may be symbolic (``jax.export``)."""
    scale = jnp.asarray(n_in, jnp.float32) / jnp.asarray(n_out, jnp.float32)
    idx = jnp.floor(jnp.arange(n_out, dtype=jnp.float32) * scale).astype(jnp.int32)
    return jnp.minimum(idx, jnp.asarray(n_in, jnp.int32) - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='nearest')`` for NHWC."""
    rows, cols = nearest_index(x.shape[1], size[0]), nearest_index(x.shape[2], size[1])
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class FPN(nnx.Module):
    """Feature pyramid: 1x1 laterals, top-down nearest upsampling to each lateral, 3x3 merges."""

    @initialized_at_once
    def __init__(self, in_channels_list: list[int], out_channels: int, *, rngs: Rngs):
        leaky = _context_slope(out_channels)
        c1, c2, c3 = in_channels_list
        self.output1 = conv_bn1X1(c1, out_channels, 1, leaky, rngs=rngs)
        self.output2 = conv_bn1X1(c2, out_channels, 1, leaky, rngs=rngs)
        self.output3 = conv_bn1X1(c3, out_channels, 1, leaky, rngs=rngs)
        self.merge1 = conv_bn(out_channels, out_channels, 1, leaky, rngs=rngs)
        self.merge2 = conv_bn(out_channels, out_channels, 1, leaky, rngs=rngs)

    def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
        output1 = self.output1(features[0])
        output2 = self.output2(features[1])
        output3 = self.output3(features[2])
        output2 = self.merge2(output2 + upsample_nearest(output3, output2.shape[1:3]))
        output1 = self.merge1(output1 + upsample_nearest(output2, output1.shape[1:3]))
        return [output1, output2, output3]


class MobileNetV1(nnx.Module):
    """MobileNetV1 x0.25 as in the original: ``stage1``-``stage3`` (strides 8, 16, 32).

    ``include_top=True`` adds the ImageNet average pool + ``fc`` classifier, used only to load and
    check the pretrained backbone checkpoint; RetinaFace uses the three stages.
    """

    @initialized_at_once
    def __init__(self, include_top: bool = False, *, rngs: Rngs):
        r = rngs
        self.stage1 = nnx.Sequential(
            conv_bn(3, 8, 2, leaky=0.1, rngs=r),
            conv_dw(8, 16, 1, rngs=r),
            conv_dw(16, 32, 2, rngs=r),
            conv_dw(32, 32, 1, rngs=r),
            conv_dw(32, 64, 2, rngs=r),
            conv_dw(64, 64, 1, rngs=r),
        )
        self.stage2 = nnx.Sequential(
            conv_dw(64, 128, 2, rngs=r), *(conv_dw(128, 128, 1, rngs=r) for _ in range(5))
        )
        self.stage3 = nnx.Sequential(conv_dw(128, 256, 2, rngs=r), conv_dw(256, 256, 1, rngs=r))
        self.fc = nnx.data(Linear(256, 1000, rngs=r) if include_top else None)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """Stage outputs at strides 8, 16, 32 (the original's IntermediateLayerGetter)."""
        s1 = self.stage1(x)
        s2 = self.stage2(s1)
        return [s1, s2, self.stage3(s2)]

    def __call__(self, x: jax.Array) -> jax.Array:
        """ImageNet logits ``[B, 1000]`` (needs ``include_top=True``)."""
        if self.fc is None:
            raise ValueError("MobileNetV1 was built without the classifier (include_top=False)")
        return self.fc(jnp.mean(self.features(x)[-1], axis=(1, 2)))
