"""The original ``models/net.py`` in Flax NNX: conv blocks, ``SSH``, ``FPN`` and ``MobileNetV1``.

Block constructors return ``ConvBlock`` (an ``nnx.Sequential``) with the same layer indices as
the original's ``nn.Sequential`` (activations are parameter-free modules), so
``body.stage1.1.3.weight`` in a torch state dict is ``body.stage1.layers[1].layers[3].kernel``
here.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.backends.native.native_training import Stats
from retinaface_jax.models.layers import (
    BatchNorm2d,
    Conv2d,
    LeakyReLU,
    Linear,
    initialized_at_once,
    leaky_relu,
)


class PendingBatchNorm(NamedTuple):
    """A block's closing BatchNorm -> LeakyReLU, not applied yet: the next block's first
    convolution reads it through (``BatchNorm2d.into_conv``)."""

    x: jax.Array  # the BatchNorm's input
    norm: BatchNorm2d
    slope: float
    stats: Stats | None = None  # x's batch statistics, from the kernel that wrote it

    def apply(self) -> jax.Array:
        return self.norm(self.x, self.slope, self.stats)


class ConvBlock(nnx.Sequential):
    """The original's ``nn.Sequential`` conv blocks, with each BatchNorm -> LeakyReLU pair run as
    one fused layer (``BatchNorm2d(x, activation=slope)``); same layers, same indices.

    ``activation``: the slope of a LeakyReLU applied after the block (0: ReLU; SSH's ReLU after
    its concatenation), fused into the block's last BatchNorm. ``pending=True``: a block ending in
    BatchNorm -> LeakyReLU returns them unapplied (:class:`PendingBatchNorm`) for the next block,
    which takes ``x`` either way. A BatchNorm gets its input's batch statistics from the
    convolution before it where that convolution's kernel computes them (``Conv2d.with_stats``).
    """

    def __call__(
        self,
        x: jax.Array | PendingBatchNorm,
        activation: float | None = None,
        *,
        pending: bool = False,
    ) -> jax.Array | PendingBatchNorm:
        layers, i = list(self.layers), 0
        stats = None  # x's batch statistics, when the layer that wrote x gave them
        if isinstance(x, PendingBatchNorm):
            first = layers[0]
            if isinstance(first, Conv2d):
                (x, stats), i = x.norm.into_conv(x.x, x.slope, first, x.stats), 1
            else:
                x = x.apply()
        while i < len(layers):
            layer = layers[i]
            after = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, BatchNorm2d) and isinstance(after, LeakyReLU):
                if pending and i + 2 == len(layers) and activation is None:
                    return PendingBatchNorm(x, layer, after.negative_slope, stats)
                following = layers[i + 2] if i + 2 < len(layers) else None
                if isinstance(following, Conv2d):  # read through by the next layer
                    x, stats = layer.into_conv(x, after.negative_slope, following, stats)
                    i += 3
                    continue
                x, stats, i = layer(x, after.negative_slope, stats), None, i + 2
            elif isinstance(layer, BatchNorm2d):
                if after is None:
                    return layer(x, activation, stats)
                x, stats, i = layer(x, None, stats), None, i + 1
            elif isinstance(layer, Conv2d):
                (x, stats), i = layer.with_stats(x), i + 1
            else:
                x, stats, i = layer(x), None, i + 1
        return x if activation is None else leaky_relu(x, activation)


def run_blocks(blocks: nnx.Sequential, x: jax.Array) -> jax.Array:
    """``blocks(x)`` for a sequence of ``ConvBlock``s, each block's closing BatchNorm ->
    LeakyReLU handed to the next block unapplied (``pending``), so that a depthwise layer there
    can read it through; the last block's output is applied."""
    for block in blocks.layers:
        x = block(x, pending=True)
    return x.apply() if isinstance(x, PendingBatchNorm) else x


def conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0, *, rngs: nnx.Rngs):
    """3x3 conv (padding 1, no bias) -> BatchNorm -> LeakyReLU(leaky)."""
    return ConvBlock(
        Conv2d(inp, oup, 3, stride, 1, bias=False, rngs=rngs), BatchNorm2d(oup), LeakyReLU(leaky)
    )


def conv_bn_no_relu(inp: int, oup: int, stride: int = 1, *, rngs: nnx.Rngs):
    """3x3 conv (padding 1, no bias) -> BatchNorm."""
    return ConvBlock(Conv2d(inp, oup, 3, stride, 1, bias=False, rngs=rngs), BatchNorm2d(oup))


def conv_bn1X1(inp: int, oup: int, stride: int = 1, leaky: float = 0.0, *, rngs: nnx.Rngs):
    """1x1 conv (no bias) -> BatchNorm -> LeakyReLU(leaky)."""
    return ConvBlock(
        Conv2d(inp, oup, 1, stride, 0, bias=False, rngs=rngs), BatchNorm2d(oup), LeakyReLU(leaky)
    )


def conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1, *, rngs: nnx.Rngs):
    """Depthwise-separable block: 3x3 depthwise -> BN -> act -> 1x1 pointwise -> BN -> act."""
    return ConvBlock(
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
    def __init__(self, in_channel: int, out_channel: int, *, rngs: nnx.Rngs):
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
        c5_1 = self.conv5X5_1(x)
        c7_2 = self.conv7X7_2(c5_1)
        # ReLU(concatenation) as each branch's ReLU, fused into its last BatchNorm
        branches = (self.conv3X3(x, 0.0), self.conv5X5_2(c5_1, 0.0), self.conv7x7_3(c7_2, 0.0))
        return jnp.concatenate(branches, -1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode='nearest')`` for NHWC: source index floor(dst * in / out).

    The scale is computed in float32 as torch does, so odd sizes map exactly as in the original.
    """

    def index(n_in: int, n_out: int) -> np.ndarray:
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
        return np.minimum(idx, n_in - 1)

    n, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    rows, cols = index(h, size[0]), index(w, size[1])
    fh, fw = size[0] // h, size[1] // w
    if np.array_equal(rows, np.arange(size[0]) // fh) and np.array_equal(
        cols, np.arange(size[1]) // fw
    ):
        return _repeat(x, fh, fw)  # every source pixel fh x fw times (the FPN's 2x at 640x640)
    return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _repeat(x: jax.Array, fh: int, fw: int) -> jax.Array:
    """Each pixel of NHWC ``x`` repeated ``fh`` x ``fw`` times, as a broadcast. Its gradient is a
    sum over the copies, much cheaper than a gather's scatter-add."""
    n, h, w, c = x.shape
    y = jnp.broadcast_to(x[:, :, None, :, None], (n, h, fh, w, fw, c))
    return y.reshape(n, h * fh, w * fw, c)


def _repeat_fwd(x, fh, fw):
    return _repeat(x, fh, fw), None


def _repeat_bwd(fh, fw, _, g):
    """The sum over the copies as ``fh * fw`` strided slices added elementwise: on CPU faster
    than XLA's reduction over the reshaped copy axes (autodiff's)."""
    total = g[:, 0::fh, 0::fw]
    for i, j in itertools.product(range(fh), range(fw)):
        if i or j:
            total = total + g[:, i::fh, j::fw]
    return (total,)


_repeat.defvjp(_repeat_fwd, _repeat_bwd)


class FPN(nnx.Module):
    """Feature pyramid: 1x1 laterals, top-down nearest upsampling to each lateral, 3x3 merges."""

    @initialized_at_once
    def __init__(self, in_channels_list: list[int], out_channels: int, *, rngs: nnx.Rngs):
        leaky = _context_slope(out_channels)
        c1, c2, c3 = in_channels_list
        self.output1 = conv_bn1X1(c1, out_channels, 1, leaky, rngs=rngs)
        self.output2 = conv_bn1X1(c2, out_channels, 1, leaky, rngs=rngs)
        self.output3 = conv_bn1X1(c3, out_channels, 1, leaky, rngs=rngs)
        self.merge1 = conv_bn(out_channels, out_channels, 1, leaky, rngs=rngs)
        self.merge2 = conv_bn(out_channels, out_channels, 1, leaky, rngs=rngs)

    def __call__(self, features: list[jax.Array]) -> list[jax.Array]:
        o1, o2, o3 = (m(f) for m, f in zip((self.output1, self.output2, self.output3), features))
        o2 = self.merge2(o2 + upsample_nearest(o3, o2.shape[1:3]))
        o1 = self.merge1(o1 + upsample_nearest(o2, o1.shape[1:3]))
        return [o1, o2, o3]


class MobileNetV1(nnx.Module):
    """MobileNetV1 x0.25 as in the original: ``stage1``-``stage3`` (strides 8, 16, 32).

    ``include_top=True`` adds the ImageNet average pool + ``fc`` classifier, used only to load and
    check the pretrained backbone checkpoint; RetinaFace uses the three stages.
    """

    @initialized_at_once
    def __init__(self, include_top: bool = False, *, rngs: nnx.Rngs):
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
        s1 = run_blocks(self.stage1, x)
        s2 = run_blocks(self.stage2, s1)
        return [s1, s2, run_blocks(self.stage3, s2)]

    def __call__(self, x: jax.Array) -> jax.Array:
        """ImageNet logits ``[B, 1000]`` (needs ``include_top=True``)."""
        if self.fc is None:
            raise ValueError("MobileNetV1 was built without the classifier (include_top=False)")
        return self.fc(jnp.mean(self.features(x)[-1], axis=(1, 2)))
