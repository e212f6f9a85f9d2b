"""JAX calls of the native CPU kernels (``cpu_conv.cc``) and the parameter layout they read.

A layer is conv -> BatchNorm (eval) -> activation, computed as ``act(conv(x, w * k) + b)`` with
the BatchNorm folded into ``w`` and ``b`` (``k = scale / sqrt(var + eps)``, ``b = bias - mean * k``)
and the activation given per output channel as a negative slope: ``y = v > 0 ? v : v * slope``
(0: ReLU, 0.1: LeakyReLU(0.1), 1: none). Every layer's parameters live in one float32 buffer
(:class:`ParamBuffer`, built once in numpy on the host); a layer is a static description
(:class:`ConvLayer`, :class:`DwLayer`) holding its offsets into that buffer. One buffer instead of
~130 arrays makes dispatching a jitted call cheap (it flattens every argument: ~1.8 ms -> ~0.1 ms
per ``detect()`` call for mobilenet0.25). The kernels need ``native.native_kernels_available()``
to have registered them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CONV_TARGET = "retinaface_conv"
CONV_DW_TARGET = "retinaface_conv_dw"
TOPK_NMS_TARGET = "retinaface_topk_nms"
NO_ACTIVATION = 1.0  # negative slope 1: y = v
_ALIGN = 16  # floats: every array starts on a 64-byte boundary of the buffer


class ConvLayer(NamedTuple):
    """A dense convolution layer: offsets of its packed weights, bias and slopes in the buffer,
    and its shape (``cin`` input channels read from channel ``cin_offset`` of the input)."""

    w: int
    b: int
    slope: int
    cin: int
    cout: int
    kernel_size: int
    stride: int
    padding: int
    cin_offset: int = 0


class DwLayer(NamedTuple):
    """MobileNet's depthwise-separable block: offsets of the depthwise ``[9, C]`` weights, bias
    and slopes, then the pointwise layer."""

    wd: int
    bd: int
    sd: int
    channels: int
    stride: int
    pw: ConvLayer


class ParamBuffer:
    """Collects float32 arrays into one flat buffer; :meth:`add` returns an array's offset."""

    def __init__(self) -> None:
        self._parts: list[np.ndarray] = []
        self._size = 0

    def add(self, values: np.ndarray) -> int:
        flat = np.ascontiguousarray(values, np.float32).reshape(-1)
        offset = self._size
        pad = -flat.size % _ALIGN
        self._parts += [flat, np.zeros(pad, np.float32)]
        self._size += flat.size + pad
        return offset

    def array(self) -> np.ndarray:
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)


def pack_weights(w2: np.ndarray) -> np.ndarray:
    """``[K, cout]`` (k ordered kh, kw, cin) -> flat blocks of 16 output channels ``[cout/16][K][16]``
    followed, if ``cout % 16 == 8``, by one ``[K][8]`` block. ``cout`` must be a multiple of 8."""
    k, cout = w2.shape
    if cout % 8:
        raise ValueError(f"pack_weights: output channels must be a multiple of 8, got {cout}")
    full = cout // 16 * 16
    blocks = w2[:, :full].reshape(k, -1, 16).transpose(1, 0, 2).reshape(-1)
    return np.ascontiguousarray(np.concatenate([blocks, w2[:, full:].reshape(-1)]), np.float32)


def fold_batchnorm(
    kernel: np.ndarray,
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Conv kernel ``[..., cout]`` and eval BatchNorm -> (folded kernel, bias), float32."""
    k = (scale / np.sqrt(var + np.float32(eps))).astype(np.float32)
    return (kernel * k).astype(np.float32), (bias - mean * k).astype(np.float32)


def conv_layer(
    buffer: ParamBuffer,
    kernel: np.ndarray,
    bias: np.ndarray,
    slope: np.ndarray,
    *,
    stride: int,
    padding: int,
    cin_offset: int = 0,
) -> ConvLayer:
    """Add a ``[k, k, cin, cout]`` kernel (cout a multiple of 8), bias and slopes to ``buffer``."""
    k, k2, cin, cout = kernel.shape
    if k != k2:
        raise ValueError(f"conv_layer: expected a square kernel, got {kernel.shape}")
    if bias.shape != (cout,) or slope.shape != (cout,):
        raise ValueError(f"conv_layer: bias {bias.shape} / slope {slope.shape} != ({cout},)")
    w = buffer.add(pack_weights(np.asarray(kernel, np.float32).reshape(-1, cout)))
    return ConvLayer(
        w, buffer.add(bias), buffer.add(slope), cin, cout, k, stride, padding, cin_offset
    )


def dw_layer(
    buffer: ParamBuffer,
    kernel: np.ndarray,
    bias: np.ndarray,
    slope: np.ndarray,
    pw: ConvLayer,
    *,
    stride: int,
) -> DwLayer:
    """Add a depthwise ``[3, 3, 1, C]`` kernel, bias and slopes to ``buffer``, followed by ``pw``."""
    c = kernel.shape[-1]
    if kernel.size != 9 * c or c % 8 or pw.cin != c or pw.kernel_size != 1:
        raise ValueError(f"dw_layer: kernel {kernel.shape} / pointwise {pw} do not fit")
    wd = buffer.add(np.asarray(kernel, np.float32).reshape(9, c))
    return DwLayer(wd, buffer.add(bias), buffer.add(slope), c, stride, pw)


def conv(x: jax.Array, params: jax.Array, layer: ConvLayer) -> jax.Array:
    """``act(conv(x[..., off:off + cin], w) + b)`` for NHWC float32 ``x``."""
    n, h, w, _ = x.shape
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    out = jax.ShapeDtypeStruct(
        (n, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, layer.cout), jnp.float32
    )
    return jax.ffi.ffi_call(CONV_TARGET, out)(
        x,
        params,
        stride=np.int64(s),
        pad=np.int64(p),
        kh=np.int64(k),
        kw=np.int64(k),
        cin=np.int64(layer.cin),
        cin_offset=np.int64(layer.cin_offset),
        w_offset=np.int64(layer.w),
        b_offset=np.int64(layer.b),
        s_offset=np.int64(layer.slope),
    )


def conv_dw(x: jax.Array, params: jax.Array, layer: DwLayer) -> jax.Array:
    """MobileNet's 3x3 depthwise (pad 1) -> act -> 1x1 pointwise -> act, in one kernel."""
    n, h, w, c = x.shape
    if c != layer.channels:
        raise ValueError(f"conv_dw: input has {c} channels, the layer expects {layer.channels}")
    s, pw = layer.stride, layer.pw
    out = jax.ShapeDtypeStruct((n, (h - 1) // s + 1, (w - 1) // s + 1, pw.cout), jnp.float32)
    return jax.ffi.ffi_call(CONV_DW_TARGET, out)(
        x,
        params,
        stride=np.int64(s),
        wd_offset=np.int64(layer.wd),
        bd_offset=np.int64(layer.bd),
        sd_offset=np.int64(layer.sd),
        w_offset=np.int64(pw.w),
        b_offset=np.int64(pw.b),
        s_offset=np.int64(pw.slope),
    )


def topk_nms(
    scores: jax.Array, boxes: jax.Array, threshold: jax.Array, top_k: int, max_keep: int
) -> tuple[jax.Array, jax.Array]:
    """Per image: the ``top_k`` best candidates (``scores [B, P]``; non-finite: none; ties by index,
    as ``jax.lax.top_k``), then greedy NMS over ``boxes [B, P, 4]`` with the float32 arithmetic
    of ``inference.postprocess.greedy_nms`` -> ``(keep [B, max_keep] int32 indices into P, -1
    after count; count [B] int32)``. One pass on the host CPU instead of XLA's sort and loop."""
    b = scores.shape[0]
    out = (jax.ShapeDtypeStruct((b, max_keep), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    call = jax.ffi.ffi_call(TOPK_NMS_TARGET, out)
    return call(scores, boxes, jnp.asarray(threshold, jnp.float32), top_k=np.int64(top_k))
