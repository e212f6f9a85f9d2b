"""``RetinaFace.__call__`` as the XLA and native CPU paths run it: a planner over the plain model.

:func:`planned_forward` walks the modules of a ``retinaface_jax.models.RetinaFace`` and computes
the same function as ``model(x)`` (train or eval mode, as the model is set), deciding the fusions
the layers themselves know nothing about:
- each BatchNorm -> LeakyReLU pair is one layer (``train_layers.batch_norm``), SSH's ReLU after
  the concatenation moves into each branch's last BatchNorm;
- a block's closing BatchNorm -> LeakyReLU is handed unapplied (:class:`PendingBatchNorm`) to
  the next layer, which reads it through when it is a 3x3 depthwise or 1x1 layer on the native
  kernels (``train_layers.batch_norm_into_conv``);
- a BatchNorm takes its input's batch statistics from the native kernel that wrote that input;
- one pyramid level's three heads are one 1x1 layer (the features read once, and once per
  gradient), split into the heads' outputs;
- a uint8 image goes to the stem as it is (:class:`conv_ops.ImageWithMean`), where the native
  train-step kernels read it and subtract the mean themselves;
- the FPN's exact 2x nearest upsampling is a broadcast whose gradient is a sum of strided slices.
With ``region`` (a padded bucket batch, eval mode) the padded region is zeroed before every
padded convolution and after ResNet50's stem, so the valid outputs equal an unpadded run.

Autodiff contract: values and first-order gradients equal the reference model's (tests); no
forward mode or higher order (custom VJPs: ``train_layers``). Use ``model(x)`` for those.
"""

from __future__ import annotations

import itertools
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.backends.native import native_training
from retinaface_jax.backends.native.native_training import Stats
from retinaface_jax.backends.padded_region import PaddedRegion, mask_padded
from retinaface_jax.backends.train_layers import (
    add_bias,
    batch_norm,
    batch_norm_into_conv,
    conv_with_stats,
    leaky_relu,
)
from retinaface_jax.backends.xla_cpu.conv_ops import ImageWithMean, conv2d
from retinaface_jax.models.layers import BatchNorm2d, Conv2d, LeakyReLU
from retinaface_jax.models.net import FPN, SSH, MobileNetV1, nearest_index
from retinaface_jax.models.resnet import Bottleneck, ResNet50, max_pool_3x3_s2
from retinaface_jax.models.retinaface import RetinaFace

Outputs = tuple[jax.Array, jax.Array, jax.Array]


def planned_forward(
    model: RetinaFace, x: jax.Array, *, region: PaddedRegion | None = None
) -> Outputs:
    """``model(x)`` (``(loc, conf_logits, landms)``; running statistics updated in train mode)
    with the fusions of the module docstring. ``region``: see the module docstring.

    Traced inside ``native_training.native_gradients(mesh)`` (a CPU train step enters it around
    its whole value-and-grad, because the kernels' backward rules are traced there too) the
    convolutions, their gradients and BatchNorm's sums run on the native kernels where they apply;
    elsewhere on XLA (``conv_ops``)."""
    return _retinaface(model, x, region)


def _retinaface(model: RetinaFace, x: jax.Array, region: PaddedRegion | None) -> Outputs:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"RetinaFace input: expected [B,H,W,3] (NHWC, BGR), got {x.shape}")
    if x.dtype == jnp.uint8:
        x = ImageWithMean(x, tuple(model.cfg.rgb_mean))
        x = x if native_training.active() and region is None else x.materialize()
    fpn = _fpn(model.fpn, _features(model.body, x, region), region)
    feats = [_ssh(ssh, f, region) for ssh, f in zip((model.ssh1, model.ssh2, model.ssh3), fpn)]
    heads = (model.BboxHead, model.ClassHead, model.LandmarkHead)
    levels = [_level_heads([h[i] for h in heads], f) for i, f in enumerate(feats)]
    return tuple(jnp.concatenate([out[k] for out in levels], axis=1) for k in range(len(heads)))


class PendingBatchNorm(NamedTuple):
    """A block's closing BatchNorm -> LeakyReLU, not applied yet: the next block's first
    convolution reads it through (``train_layers.batch_norm_into_conv``)."""

    x: jax.Array  # the BatchNorm's input
    norm: BatchNorm2d
    slope: float
    stats: Stats | None = None  # x's batch statistics, from the kernel that wrote it

    def apply(self) -> jax.Array:
        return batch_norm(self.norm, self.x, self.slope, self.stats)


def conv_block(
    block: nnx.Sequential,
    x: jax.Array | PendingBatchNorm,
    region: PaddedRegion | None,
    activation: float | None = None,
    *,
    pending: bool = False,
) -> jax.Array | PendingBatchNorm:
    """``block(x)`` for one of the original's conv blocks (``nnx.Sequential`` of Conv2d,
    BatchNorm2d, LeakyReLU). ``activation``: the slope of a LeakyReLU after the block (0: ReLU),
    fused into its last BatchNorm. ``pending=True``: a block ending in BatchNorm -> LeakyReLU
    returns them unapplied for the next block, which takes ``x`` either way."""
    layers, i = list(block.layers), 0
    stats = None  # x's batch statistics, when the layer that wrote x gave them
    if isinstance(x, PendingBatchNorm):
        first = layers[0]
        if isinstance(first, Conv2d):
            (x, stats), i = batch_norm_into_conv(x.norm, x.x, x.slope, first, x.stats, region), 1
        else:
            x = x.apply()
    while i < len(layers):
        layer = layers[i]
        after = layers[i + 1] if i + 1 < len(layers) else None
        if isinstance(layer, BatchNorm2d) and isinstance(after, LeakyReLU):
            slope = after.negative_slope
            if pending and i + 2 == len(layers) and activation is None:
                return PendingBatchNorm(x, layer, slope, stats)
            following = layers[i + 2] if i + 2 < len(layers) else None
            if isinstance(following, Conv2d):  # read through by the next layer
                x, stats = batch_norm_into_conv(layer, x, slope, following, stats, region)
                i += 3
                continue
            x, stats, i = batch_norm(layer, x, slope, stats), None, i + 2
        elif isinstance(layer, BatchNorm2d):
            if after is None:
                return batch_norm(layer, x, activation, stats)
            x, stats, i = batch_norm(layer, x, None, stats), None, i + 1
        elif isinstance(layer, Conv2d):
            (x, stats), i = conv_with_stats(layer, x, region), i + 1
        else:
            x, stats, i = layer(x), None, i + 1
    return x if activation is None else leaky_relu(x, activation)


def conv_blocks(blocks: nnx.Sequential, x: jax.Array, region: PaddedRegion | None) -> jax.Array:
    """A sequence of blocks, each block's closing BatchNorm -> LeakyReLU handed to the next."""
    for block in blocks.layers:
        x = conv_block(block, x, region, pending=True)
    return x.apply() if isinstance(x, PendingBatchNorm) else x


def _features(body: nnx.Module, x: jax.Array, region: PaddedRegion | None) -> list[jax.Array]:
    """The body's stage outputs at strides 8, 16, 32."""
    if isinstance(body, MobileNetV1):
        s1 = conv_blocks(body.stage1, x, region)
        s2 = conv_blocks(body.stage2, s1, region)
        return [s1, s2, conv_blocks(body.stage3, s2, region)]
    if isinstance(body, ResNet50):
        return resnet_features(body, x, region)
    raise TypeError(f"planned_forward: no plan for a {type(body).__name__} body")


def resnet_features(
    body: ResNet50, x: jax.Array, region: PaddedRegion | None = None
) -> list[jax.Array]:
    """``body.features(x)`` (layer2-layer4) with the fusions and ``region``'s masks."""
    x = mask_padded(_conv_bn(body.conv1, body.bn1, x, 0.0, region), region)
    x = _stage(body.layer1, max_pool_3x3_s2(x), region)  # (the pool never sees padding)
    c2 = _stage(body.layer2, x, region)
    c3 = _stage(body.layer3, c2, region)
    return [c2, c3, _stage(body.layer4, c3, region)]


def _stage(blocks: nnx.Sequential, x: jax.Array, region: PaddedRegion | None) -> jax.Array:
    for block in blocks.layers:
        x = _bottleneck(block, x, region)
    return x


def _conv_bn(conv, norm, x, activation, region):
    """``leaky_relu(norm(conv(x)), activation)`` with the convolution's statistics."""
    y, stats = conv_with_stats(conv, x, region)
    return batch_norm(norm, y, activation, stats)


def _bottleneck(block: Bottleneck, x: jax.Array, region: PaddedRegion | None) -> jax.Array:
    y = _conv_bn(block.conv1, block.bn1, x, 0.0, region)
    y = _conv_bn(block.conv2, block.bn2, y, 0.0, region)
    y = _conv_bn(block.conv3, block.bn3, y, None, region)
    identity = x if block.downsample is None else conv_block(block.downsample, x, region)
    return jax.nn.relu(y + identity)


def _ssh(ssh: SSH, x: jax.Array, region: PaddedRegion | None) -> jax.Array:
    c5_1 = conv_block(ssh.conv5X5_1, x, region)
    c7_2 = conv_block(ssh.conv7X7_2, c5_1, region)
    # ReLU(concatenation) as each branch's ReLU, fused into its last BatchNorm
    branches = (
        conv_block(ssh.conv3X3, x, region, 0.0),
        conv_block(ssh.conv5X5_2, c5_1, region, 0.0),
        conv_block(ssh.conv7x7_3, c7_2, region, 0.0),
    )
    return jnp.concatenate(branches, -1)


def _fpn(fpn: FPN, features: list[jax.Array], region: PaddedRegion | None) -> list[jax.Array]:
    laterals = (fpn.output1, fpn.output2, fpn.output3)
    o1, o2, o3 = (conv_block(m, f, region) for m, f in zip(laterals, features))
    o2 = conv_block(fpn.merge2, o2 + upsample_nearest(o3, o2.shape[1:3]), region)
    o1 = conv_block(fpn.merge1, o1 + upsample_nearest(o2, o1.shape[1:3]), region)
    return [o1, o2, o3]


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``models.net.upsample_nearest``; an exact integer factor as a broadcast (:func:`_repeat`)."""
    h, w = x.shape[1:3]
    if (h, w) == tuple(size):
        return x
    with jax.ensure_compile_time_eval():  # (static sizes here: numpy tables)
        rows, cols = np.asarray(nearest_index(h, size[0])), np.asarray(nearest_index(w, size[1]))
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


def _level_heads(heads: list[nnx.Module], x: jax.Array) -> list[jax.Array]:
    """One pyramid level's 1x1 heads as one layer: their kernels and biases side by side, so the
    level's features are read once (and once per gradient) instead of once per head. Each head's
    output ``[B, H*W*A, width]`` is its slice of the channels."""
    convs = [h.conv1x1 for h in heads]
    kernel = jnp.concatenate([c.kernel[...] for c in convs], axis=-1)
    y = add_bias(conv2d(x, kernel, 1, 0, 1), jnp.concatenate([c.bias[...] for c in convs]))
    cuts = np.cumsum([c.out_channels for c in convs])[:-1].tolist()
    parts = jnp.split(y, cuts, axis=-1)  # its transpose is one concatenation, not pads and adds
    return [p.reshape(p.shape[0], -1, h.width) for p, h in zip(parts, heads)]
