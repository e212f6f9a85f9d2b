"""``RetinaFace`` in eval mode on the native CPU kernels (``retinaface_jax.backends.native``).

The same function as ``RetinaFace.__call__`` with running BatchNorm statistics, computed layer by
layer as fused conv -> BatchNorm -> activation kernels:
- MobileNetV1: the stem as a dense 3x3 layer (reading a uint8 image directly, mean subtracted in
  the kernel), every ``conv_dw`` block as one kernel (the depthwise output row never leaves the
  cache); a ResNet50 body stays on XLA;
- every 3x3 stride-1 layer (FPN merges, SSH) by Winograd F(4x4, 3x3) (``ops.conv_layer``);
- FPN: the 1x1 laterals and 3x3 merges (the nearest upsampling and the add stay on XLA);
- SSH: three kernels instead of five. ``conv3X3`` and ``conv5X5_1`` read the same input, so they
  run as one layer with their channels ReLU'd (the ReLU after the concat, moved into the layer)
  and LeakyReLU'd respectively; likewise ``conv5X5_2`` with ``conv7X7_2``; then ``conv7x7_3``. The
  second and third read a channel slice of the previous output in place;
- the three heads of a level as one 1x1 layer, and all levels' heads as one kernel call, which
  reads the SSH output's three channel slices in place (no concatenation) and writes one
  ``[B, cells, channels]`` array that is split into loc / conf / landms.
:func:`kernel_params` folds and packs the parameters once on the host into one flat buffer and a
static :class:`KernelPlan` (the layers' offsets and shapes); :func:`kernel_forward` runs the plan.
With padded inputs (``region``) the same masking as the XLA path applies
(``backends.padded_region.mask_padded`` before every padded convolution).

Autodiff contract: none (inference only; the kernels have no derivative rules). Parity: equal to
``model(x)`` in eval mode (``tests/test_kernel_forward.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.backends.native import ops
from retinaface_jax.backends.padded_region import PaddedRegion, mask_padded
from retinaface_jax.backends.planned_forward import upsample_nearest
from retinaface_jax.models.layers import BatchNorm2d, Conv2d, LeakyReLU
from retinaface_jax.models.net import MobileNetV1

Folded = tuple[np.ndarray, np.ndarray, np.ndarray]  # kernel [kh, kw, cin, cout], bias, slope
_HEADS = ("BboxHead", "ClassHead", "LandmarkHead")


class KernelPlan(NamedTuple):
    """What :func:`kernel_forward` runs: every layer by name (``ops.ConvLayer`` / ``ops.DwLayer``,
    offsets into the parameter buffer), whether the body is MobileNetV1 (else it runs on XLA),
    each SSH level's ``(conv3X3, conv5X5_1)`` channel counts, each head's
    ``(channels, numbers per anchor)`` (the same at every level) and where the BGR mean is."""

    layers: dict[str, ops.ConvLayer | ops.DwLayer]
    mobilenet_body: bool
    ssh_channels: tuple[tuple[int, int], ...]
    heads: tuple[tuple[int, int], ...]
    mean: int  # offset of the config's BGR mean (subtracted from uint8 inputs)


def _host(v: Any) -> np.ndarray:
    return np.asarray(jax.device_get(v[...]), np.float32)


def _fold(conv: Conv2d, bn: BatchNorm2d | None, slope: float) -> Folded:
    kernel = _host(conv.kernel)
    bias = _host(conv.bias) if conv.bias is not None else np.zeros(kernel.shape[-1], np.float32)
    if bn is not None:
        # bn(conv + c) = conv * k + (beta - (mean - c) * k)
        kernel, bias = ops.fold_batchnorm(
            kernel, _host(bn.scale), _host(bn.bias), _host(bn.mean) - bias, _host(bn.var), bn.eps
        )
    return kernel, bias, np.full(kernel.shape[-1], slope, np.float32)


def _fold_block(block: nnx.Sequential, slope: float | None = None) -> Folded:
    """``conv_bn`` / ``conv_bn_no_relu`` / ``conv_bn1X1``; ``slope`` overrides the block's own."""
    conv, bn, *rest = block.layers
    if slope is None:
        has_act = rest and isinstance(rest[0], LeakyReLU)
        slope = rest[0].negative_slope if has_act else ops.NO_ACTIVATION
    return _fold(conv, bn, slope)


def _layer(
    buf: ops.ParamBuffer, *parts: Folded, stride: int = 1, padding: int = 1, cin_offset: int = 0
) -> ops.ConvLayer:
    """Layers reading the same input, concatenated along the output channels, zero-padded to a
    multiple of 8 channels."""
    kernel = np.concatenate([k for k, _, _ in parts], -1)
    bias = np.concatenate([b for _, b, _ in parts])
    slope = np.concatenate([s for _, _, s in parts])
    pad = -kernel.shape[-1] % 8
    if pad:
        kernel = np.concatenate([kernel, np.zeros((*kernel.shape[:-1], pad), np.float32)], -1)
        bias = np.concatenate([bias, np.zeros(pad, np.float32)])
        slope = np.concatenate([slope, np.full(pad, ops.NO_ACTIVATION, np.float32)])
    return ops.conv_layer(
        buf, kernel, bias, slope, stride=stride, padding=padding, cin_offset=cin_offset
    )


def _block_layer(buf: ops.ParamBuffer, block: nnx.Sequential) -> ops.ConvLayer | ops.DwLayer:
    if len(block.layers) == 6:  # conv_dw
        dw, bn1, act1, pw, bn2, act2 = block.layers
        point = _layer(buf, _fold(pw, bn2, act2.negative_slope), padding=0)
        return ops.dw_layer(buf, *_fold(dw, bn1, act1.negative_slope), point, stride=dw.stride)
    conv = block.layers[0]
    return _layer(buf, _fold_block(block), stride=conv.stride, padding=conv.padding)


def kernel_params(model: nnx.Module) -> tuple[np.ndarray, KernelPlan]:
    """Fold and pack ``model``'s eval-mode parameters: ``(flat float32 buffer, plan)`` (host)."""
    buf = ops.ParamBuffer()
    layers: dict[str, ops.ConvLayer | ops.DwLayer] = {}
    mobilenet = isinstance(model.body, MobileNetV1)
    if mobilenet:
        for name in ("stage1", "stage2", "stage3"):
            for i, block in enumerate(getattr(model.body, name).layers):
                layers[f"body.{name}.{i}"] = _block_layer(buf, block)
    for name in ("output1", "output2", "output3", "merge1", "merge2"):
        layers[f"fpn.{name}"] = _block_layer(buf, getattr(model.fpn, name))
    ssh_channels = []
    for level in (1, 2, 3):
        ssh = getattr(model, f"ssh{level}")
        half, quarter = ssh.conv3X3.layers[0].out_channels, ssh.conv5X5_1.layers[0].out_channels
        relu = 0.0  # the ReLU after the SSH concat
        a = (_fold_block(ssh.conv3X3, relu), _fold_block(ssh.conv5X5_1))
        b = (_fold_block(ssh.conv5X5_2, relu), _fold_block(ssh.conv7X7_2))
        layers[f"ssh{level}.a"] = _layer(buf, *a)
        layers[f"ssh{level}.b"] = _layer(buf, *b, cin_offset=half)
        layers[f"ssh{level}.c"] = _layer(buf, _fold_block(ssh.conv7x7_3, relu), cin_offset=quarter)
        ssh_channels.append((half, quarter))
    heads: set[tuple[tuple[int, int], ...]] = set()
    for level in range(3):
        modules = [getattr(model, name)[level] for name in _HEADS]
        parts = (_fold(h.conv1x1, None, ops.NO_ACTIVATION) for h in modules)
        layers[f"heads.{level}"] = _layer(buf, *parts, padding=0)
        heads.add(tuple((h.conv1x1.out_channels, h.width) for h in modules))
    mean = buf.add(np.asarray(model.cfg.rgb_mean, np.float32))
    if len(heads) != 1:  # one layout: the levels' outputs come out of one kernel call
        raise ValueError(f"kernel_params: the levels' heads differ in layout: {sorted(heads)}")
    plan = KernelPlan(layers, mobilenet, tuple(ssh_channels), heads.pop(), mean)
    return buf.array(), plan


def _run(
    plan: KernelPlan, params: jax.Array, name: str, x: jax.Array, region: PaddedRegion | None
) -> jax.Array:
    layer = plan.layers[name]
    if isinstance(layer, ops.DwLayer):
        return ops.conv_dw(mask_padded(x, region), params, layer)
    if x.dtype == jnp.uint8:  # the image, read by the stem kernel (see _network_input)
        return ops.conv(x, params, layer, mean=plan.mean)
    return ops.conv(mask_padded(x, region) if layer.padding else x, params, layer)


def _network_input(plan: KernelPlan, params: jax.Array, x: jax.Array, masked: bool) -> jax.Array:
    """A uint8 image stays uint8 when the MobileNetV1 stem kernel can subtract the mean itself
    (no padded region to zero: masking needs the float input); else ``float32(x) - mean`` here."""
    if x.dtype != jnp.uint8 or (plan.mobilenet_body and not masked):
        return x
    return x.astype(jnp.float32) - params[plan.mean : plan.mean + x.shape[-1]]


def kernel_forward(
    plan: KernelPlan,
    params: jax.Array,
    x: jax.Array,
    body: Callable[[jax.Array], list[jax.Array]] | None = None,
    region: PaddedRegion | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``model(x)`` (eval mode) on the native kernels: ``(loc, conf_logits, landms)``.

    ``plan, params = kernel_params(model)``; ``x``: float32 BGR minus the mean, or the uint8 BGR
    image (the same as ``float32(x) - cfg.rgb_mean``); ``body``: the backbone's ``features`` when
    it is not MobileNetV1 (for ResNet50, which runs on XLA:
    ``partial(planned_forward.resnet_features, model.body, region=region)``). ``region``: a
    ``backends.padded_region.PaddedRegion`` for padded inputs (zeroed before every padded
    convolution), or None.
    """
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype not in (jnp.float32, jnp.uint8):
        raise ValueError(
            f"RetinaFace input: expected [B,H,W,3] float32 or uint8 (NHWC, BGR), got "
            f"{x.shape} {x.dtype}"
        )
    x = _network_input(plan, params, x, region is not None)
    if plan.mobilenet_body:
        feats = []
        for name, n in (("stage1", 6), ("stage2", 6), ("stage3", 2)):
            for i in range(n):
                x = _run(plan, params, f"body.{name}.{i}", x, region)
            feats.append(x)
    elif body is None:
        raise ValueError("kernel_forward: this model's body is not MobileNetV1; pass body=")
    else:
        feats = body(x)

    def run(name: str, x: jax.Array) -> jax.Array:
        return _run(plan, params, name, x, region)

    o1, o2, o3 = (run(f"fpn.output{i + 1}", f) for i, f in enumerate(feats))
    o2 = run("fpn.merge2", o2 + upsample_nearest(o3, o2.shape[1:3]))
    o1 = run("fpn.merge1", o1 + upsample_nearest(o2, o1.shape[1:3]))
    levels = []
    for level, f in enumerate((o1, o2, o3)):
        half, quarter = plan.ssh_channels[level]
        a = run(f"ssh{level + 1}.a", f)
        b = run(f"ssh{level + 1}.b", a)
        c = run(f"ssh{level + 1}.c", b)
        # the SSH output is [a[..., :half], b[..., :quarter], c]: read in place by the heads
        levels.append((plan.layers[f"heads.{level}"], ((a, half), (b, quarter), (c, quarter))))
    y = ops.heads(params, levels)  # [B, cells, (bbox | class | landmark) x anchors]
    outputs, start = [], 0
    for channels, width in plan.heads:
        outputs.append(y[..., start : start + channels].reshape(y.shape[0], -1, width))
        start += channels
    loc, conf, landms = outputs
    return loc, conf, landms
