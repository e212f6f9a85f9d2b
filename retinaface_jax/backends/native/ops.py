"""JAX calls of the native CPU kernels (``cpu_conv.cc``) and the parameter layout they read.

A layer is conv -> BatchNorm (eval) -> activation, computed as ``act(conv(x, w * k) + b)`` with
the BatchNorm folded into ``w`` and ``b`` (``k = scale / sqrt(var + eps)``, ``b = bias - mean * k``)
and the activation given per output channel as a negative slope: ``y = v > 0 ? v : v * slope``
(0: ReLU, 0.1: LeakyReLU(0.1), 1: none). Every layer's parameters live in one float32 buffer
(:class:`ParamBuffer`, built once in numpy on the host); a layer is a static description
(:class:`ConvLayer`, :class:`DwLayer`) holding its offsets into that buffer. One buffer instead of
~130 arrays makes dispatching a jitted call cheap (it flattens every argument on every
``detect()`` call). The kernels need ``native.native_kernels_available()``
to have registered them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CONV_TARGET = "retinaface_conv"
CONV_DW_TARGET = "retinaface_conv_dw"
WINOGRAD_TARGET = "retinaface_conv_winograd"
U8_TARGET = "retinaface_conv_u8"
HEADS_TARGET = "retinaface_heads"
TOPK_NMS_TARGET = "retinaface_topk_nms"
DEPTHWISE_TARGET = "retinaface_depthwise"
DEPTHWISE_GRAD_TARGET = "retinaface_depthwise_grad"
DEPTHWISE_BN_TARGET = "retinaface_depthwise_bn"
DEPTHWISE_BN_GRAD_TARGET = "retinaface_depthwise_bn_grad"
CONV_BN_TARGET = "retinaface_conv_bn"
CONV_BN_GRAD_TARGET = "retinaface_conv_bn_grad"
MOMENTS_TARGET = "retinaface_moments"
BN_GRAD_SUMS_TARGET = "retinaface_bn_grad_sums"
WEIGHT_GRAD_TARGET = "retinaface_weight_grad"
WEIGHT_GRAD_U8_TARGET = "retinaface_weight_grad_u8"
MATCH_OVERLAPS_TARGET = "retinaface_match_overlaps"
NO_ACTIVATION = 1.0  # negative slope 1: y = v
ROW_BLOCKS = 8  # row blocks per image of the depthwise and conv_bn gradients: 64 tasks at batch 8
MAX_CIN = 4096  # the widest input a conv kernel reads (kMaxCin in cpu_conv.cc)
_ALIGN = 16  # floats: every array starts on a 64-byte boundary of the buffer


class ConvLayer(NamedTuple):
    """A dense convolution layer: offsets of its packed weights, bias and slopes in the buffer,
    and its shape (``cin`` input channels read from channel ``cin_offset`` of the input); run by
    Winograd F(4x4, 3x3) when ``winograd``."""

    w: int
    b: int
    slope: int
    cin: int
    cout: int
    kernel_size: int
    stride: int
    padding: int
    cin_offset: int = 0
    winograd: bool = False  # weights stored Winograd-transformed (see winograd_weights)


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


def pack_weights(w2: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """``[..., K, cout]`` (k ordered kh, kw, cin) -> per leading index, flat blocks of 16 output
    channels ``[cout/16][K][16]`` followed, if ``cout % 16 == 8``, by one ``[K][8]`` block, all
    flattened. ``cout`` must be a multiple of 8. numpy in, numpy out (packed once on the host); a
    JAX array (the train step's weights, which change every step) is packed by XLA, the
    leading axis (Winograd's 36 matrices) in one pass."""
    *lead, k, cout = w2.shape
    if cout % 8:
        raise ValueError(f"pack_weights: output channels must be a multiple of 8, got {cout}")
    xp = jnp if isinstance(w2, jax.Array) else np
    full = cout // 16 * 16
    blocks = xp.swapaxes(w2[..., :full].reshape(*lead, k, -1, 16), -3, -2)
    parts = [blocks.reshape(*lead, -1)]
    if full < cout:
        parts.append(w2[..., full:].reshape(*lead, -1))
    return xp.concatenate(parts, axis=-1).reshape(-1).astype(np.float32)


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


# Winograd F(4x4, 3x3) kernel transform G (Lavin & Gray, 2016; interpolation points 0, +-1, +-2
# and infinity): U = G g G^T per channel pair, a 6x6 tile.
_WINOGRAD_G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ]
)


def winograd_applies(kernel_size: int, stride: int, cin: int) -> bool:
    """Whether a layer can run as Winograd F(4x4, 3x3): 3x3, stride 1, ``cin`` a multiple of 8."""
    return kernel_size == 3 and stride == 1 and cin % 8 == 0


def winograd_weights(kernel: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
    """``[3, 3, cin, cout]`` -> ``[36, cin, cout]``: ``G g G^T`` for each channel pair (element
    ``6 * a + b`` of the 6x6 transformed tile). A numpy kernel is transformed in float64 and
    rounded once to float32; a JAX array (training) in float32 by XLA."""
    if isinstance(kernel, jax.Array):
        g, G = kernel, _WINOGRAD_G.astype(np.float32)
        einsum = partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
    else:
        g, G, einsum = np.asarray(kernel, np.float64), _WINOGRAD_G, np.einsum
    u = einsum("ai,ijcd,bj->abcd", G, g, G)
    return u.reshape(36, *g.shape[2:]).astype(np.float32)


def packed_weights(kernel: np.ndarray | jax.Array, winograd: bool) -> np.ndarray | jax.Array:
    """A ``[k, k, cin, cout]`` kernel as the conv kernels read it: packed (:func:`pack_weights`),
    per element of the Winograd tile when ``winograd``."""
    if winograd:
        return pack_weights(winograd_weights(kernel))
    return pack_weights(kernel.reshape(-1, kernel.shape[-1]).astype(np.float32))


def conv_layer(
    buffer: ParamBuffer,
    kernel: np.ndarray,
    bias: np.ndarray,
    slope: np.ndarray,
    *,
    stride: int,
    padding: int,
    cin_offset: int = 0,
    winograd: bool | None = None,
) -> ConvLayer:
    """Add a ``[k, k, cin, cout]`` kernel (cout a multiple of 8), bias and slopes to ``buffer``.

    ``winograd``: run the layer as Winograd F(4x4, 3x3) (None: whenever :func:`winograd_applies`;
    4x fewer multiply-adds; results differ from the direct convolution by float32 rounding, up to
    ~2e-5 on unit-scale outputs).
    """
    k, k2, cin, cout = kernel.shape
    if k != k2:
        raise ValueError(f"conv_layer: expected a square kernel, got {kernel.shape}")
    if bias.shape != (cout,) or slope.shape != (cout,):
        raise ValueError(f"conv_layer: bias {bias.shape} / slope {slope.shape} != ({cout},)")
    applies = winograd_applies(k, stride, cin)
    if winograd and not applies:
        raise ValueError(
            f"conv_layer: Winograd needs a 3x3 stride-1 kernel with cin a multiple of 8, got "
            f"{kernel.shape} stride {stride}"
        )
    winograd = applies if winograd is None else winograd
    w = buffer.add(packed_weights(np.asarray(kernel), winograd))
    return ConvLayer(
        w, buffer.add(bias), buffer.add(slope), cin, cout, k, stride, padding, cin_offset, winograd
    )


def plain_layer(kernel: jax.Array, *, stride: int, padding: int) -> tuple[jax.Array, ConvLayer]:
    """A convolution without bias or activation whose weights are a JAX array (the train step's,
    which change every step): ``(params, layer)``, the parameters packed by XLA in
    :class:`ParamBuffer`'s layout (Winograd-transformed when :func:`winograd_applies`)."""
    k, _, cin, cout = kernel.shape
    winograd = winograd_applies(k, stride, cin)
    packed = packed_weights(kernel, winograd)
    bias = packed.size + -packed.size % _ALIGN
    slope = bias + cout + -cout % _ALIGN
    params = jnp.concatenate(
        [
            packed,
            jnp.zeros(slope - packed.size, jnp.float32),
            jnp.full(cout, NO_ACTIVATION, jnp.float32),
        ]
    )
    return params, ConvLayer(0, bias, slope, cin, cout, k, stride, padding, 0, winograd)


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


def _moments_results(
    y: jax.ShapeDtypeStruct, moments: bool
) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """The results of a kernel writing ``y [N, OH, OW, CO]``: ``y``, then, if ``moments``, its
    per-image moments ``[N, 2, CO]`` as :func:`moments` gives them, from each output row's
    moments computed by the kernel while the row is in cache (``row_moments`` in
    ``cpu_conv.cc``: a BatchNorm's statistics without another pass over ``y``); else nothing
    (zero elements)."""
    return y, jax.ShapeDtypeStruct((y.shape[0], 2, y.shape[3]) if moments else (0,), jnp.float32)


def _with_moments(results: tuple[jax.Array, jax.Array], moments: bool):
    return results if moments else results[0]


def conv(
    x: jax.Array,
    params: jax.Array,
    layer: ConvLayer,
    mean: int | None = None,
    *,
    moments: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``act(conv(x[..., off:off + cin], w) + b)`` for NHWC float32 ``x``; with ``moments``,
    ``(y, moments [N, 2, CO])`` (see :func:`moments`).

    A uint8 ``x`` (an image, all of whose ``cin < 8`` channels the layer reads) is read as
    ``float32(x) - params[mean : mean + cin]`` by the kernel itself: no float32 copy of the image.
    """
    n, h, w, c = x.shape
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    out = jax.ShapeDtypeStruct(
        (n, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, layer.cout), jnp.float32
    )
    offsets = _offsets(layer)
    shape = dict(stride=np.int64(s), pad=np.int64(p), kh=np.int64(k), kw=np.int64(k))
    if x.dtype == jnp.uint8:
        if mean is None or c != layer.cin or layer.cin_offset or layer.cin >= 8 or layer.winograd:
            raise ValueError(
                f"conv: a uint8 input needs a mean offset and a narrow layer reading all its "
                f"{c} channels, got mean={mean}, {layer}"
            )
        call = jax.ffi.ffi_call(U8_TARGET, _moments_results(out, moments))
        return _with_moments(call(x, params, m_offset=np.int64(mean), **shape, **offsets), moments)
    channels = dict(cin=np.int64(layer.cin), cin_offset=np.int64(layer.cin_offset))
    results = _moments_results(out, moments)
    if layer.winograd:
        call = jax.ffi.ffi_call(WINOGRAD_TARGET, results)
        return _with_moments(call(x, params, pad=np.int64(p), **channels, **offsets), moments)
    call = jax.ffi.ffi_call(CONV_TARGET, results)
    return _with_moments(call(x, params, **shape, **channels, **offsets), moments)


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


def heads(
    params: jax.Array,
    levels: Sequence[tuple[ConvLayer, Sequence[tuple[jax.Array, int]]]],
) -> jax.Array:
    """1x1 layers over every level in one kernel -> ``[B, cells, cout]``, level 1's cells (row
    major) first. Each level is ``(layer, parts)``: the layer's input is the concatenation along
    channels of ``parts``, three ``(x, cin)`` pairs each reading ``x[..., :cin]``, which the kernel
    reads in place (the concatenation is never built). Every layer has the same ``cout``."""
    if len({layer.cout for layer, _ in levels}) != 1:
        raise ValueError("heads: every level's layer must have the same cout")
    tensors, segments, offsets, cells = [], [], [], 0
    for layer, parts in levels:
        if len(parts) != 3 or layer.kernel_size != 1 or layer.winograd:
            raise ValueError(f"heads: a 1x1 layer over three parts per level, got {layer}")
        if sum(cin for _, cin in parts) != layer.cin:
            raise ValueError(f"heads: parts of {[c for _, c in parts]} channels != cin {layer.cin}")
        for x, cin in parts:
            tensors.append(x)
            segments += [cin, 0]
        offsets += [layer.w, layer.b, layer.slope]
        cells += parts[0][0].shape[1] * parts[0][0].shape[2]
    n, cout = tensors[0].shape[0], levels[0][0].cout
    out = jax.ShapeDtypeStruct((n, cells, cout), jnp.float32)
    return jax.ffi.ffi_call(HEADS_TARGET, out)(
        params, *tensors, segments=np.array(segments, np.int64), offsets=np.array(offsets, np.int64)
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


def match_overlaps(
    truths: jax.Array, usable: jax.Array, priors: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The IoU bookkeeping of MultiBoxLoss's matching in one pass (``loss._best_overlaps``).

    ``truths [B, M, 4]`` and ``priors [P, 4]`` in point form, ``usable [B, M]`` bool ->
    ``(face_best [B, M], face_idx [B, M], prior_best [B, P], prior_idx [B, P])``: per face the
    overlap of its best prior and that prior's first index (-1 / 0 for a face that is not usable),
    per prior the overlap of its best usable face and that face's first index (-1 / 0 when none).
    The IoU is the original's expression with every float32 operation rounded."""
    b, m = usable.shape
    p = priors.shape[0]
    out = (
        jax.ShapeDtypeStruct((b, m), jnp.float32),
        jax.ShapeDtypeStruct((b, m), jnp.int32),
        jax.ShapeDtypeStruct((b, p), jnp.float32),
        jax.ShapeDtypeStruct((b, p), jnp.int32),
    )
    return jax.ffi.ffi_call(MATCH_OVERLAPS_TARGET, out)(
        truths.astype(jnp.float32), usable.astype(bool), priors.astype(jnp.float32)
    )


def _depthwise_shapes(x: jax.Array, kernel: jax.Array, stride: int) -> tuple[int, int]:
    n, h, w, c = x.shape
    if kernel.shape != (3, 3, 1, c) or c % 8 or stride not in (1, 2):
        raise ValueError(
            f"depthwise: expected x [N, H, W, C] with C a multiple of 8, kernel [3, 3, 1, C] and "
            f"stride 1 or 2, got x {x.shape}, kernel {kernel.shape}, stride {stride}"
        )
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def depthwise(
    x: jax.Array, kernel: jax.Array, stride: int, *, moments: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The 3x3 depthwise convolution (pad 1, no bias) of ``x [N, H, W, C]`` with an HWIO
    ``kernel [3, 3, 1, C]`` taken as an array (training: the weights change every step); with
    ``moments``, ``(y, moments [N, 2, C])`` (see :func:`moments`)."""
    oh, ow = _depthwise_shapes(x, kernel, stride)
    out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, x.shape[3]), jnp.float32)
    call = jax.ffi.ffi_call(DEPTHWISE_TARGET, _moments_results(out, moments))
    return _with_moments(call(x, kernel, stride=np.int64(stride)), moments)


def depthwise_grad(
    x: jax.Array, kernel: jax.Array, dy: jax.Array, stride: int
) -> tuple[jax.Array, jax.Array]:
    """Gradients of :func:`depthwise` for the cotangent ``dy``: ``(dx [N, H, W, C], dkernel per
    image [N, 3, 3, 1, C])``; the caller sums ``dkernel`` over images (kept per image so the call
    is independent per image, as a data-sharded batch needs)."""
    oh, ow = _depthwise_shapes(x, kernel, stride)
    n, h, w, c = x.shape
    if dy.shape != (n, oh, ow, c):
        raise ValueError(f"depthwise_grad: dy {dy.shape}, expected {(n, oh, ow, c)}")
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct((n, min(oh, ROW_BLOCKS), 9, c), jnp.float32),
    )
    dx, dk = jax.ffi.ffi_call(DEPTHWISE_GRAD_TARGET, out)(x, kernel, dy, stride=np.int64(stride))
    return dx, jnp.sum(dk, axis=1).reshape(n, 3, 3, 1, c)


def _check_vectors(what: str, c: int, **vectors: jax.Array) -> None:
    bad = {name: v.shape for name, v in vectors.items() if v.shape != (c,)}
    if bad:
        raise ValueError(f"{what}: expected [{c}] vectors, got {bad}")


def depthwise_bn(
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    slope: float,
    stride: int,
    *,
    moments: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``depthwise(leaky_relu(x * scale + shift, slope), kernel, stride)`` with the activation
    computed row by row inside the kernel, never stored: ``x`` is a BatchNorm's input, ``scale``
    and ``shift [C]`` its batch statistics and affine parameters folded together. With
    ``moments``, ``(y, moments [N, 2, C])`` (see :func:`moments`)."""
    oh, ow = _depthwise_shapes(x, kernel, stride)
    _check_vectors("depthwise_bn", x.shape[3], scale=scale, shift=shift)
    out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, x.shape[3]), jnp.float32)
    call = jax.ffi.ffi_call(DEPTHWISE_BN_TARGET, _moments_results(out, moments))
    results = call(x, kernel, scale, shift, stride=np.int64(stride), slope=np.float32(slope))
    return _with_moments(results, moments)


def depthwise_bn_grad(
    x: jax.Array,
    kernel: jax.Array,
    dy: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    mean: jax.Array,
    slope: float,
    stride: int,
    stats: StatsCotangent | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of :func:`depthwise_bn` for the cotangent ``dy``: ``(dx, dkernel, sums)`` with
    ``dx [N, H, W, C]`` the BatchNorm's direct input gradient ``scale * g`` (``g`` the cotangent
    before the activation; the part through the batch statistics is the caller's),
    ``dkernel [N, B, 3, 3, 1, C]`` per image and block of rows (``B = min(output rows,
    ROW_BLOCKS)``: tasks for the thread pool) and ``sums [N, H, 2, C]`` per row of ``dx``: the
    BatchNorm's backward sums ``sum(g)`` and ``sum(g * (x - mean))``, as :func:`bn_grad_sums`
    computes them per image. The caller sums ``dkernel`` and ``sums`` over the batch. ``stats``:
    the part of ``dy`` through the statistics of the BatchNorm after this layer, added as ``dy``
    is read (:class:`StatsCotangent`)."""
    oh, ow = _depthwise_shapes(x, kernel, stride)
    n, h, w, c = x.shape
    if dy.shape != (n, oh, ow, c):
        raise ValueError(f"depthwise_bn_grad: dy {dy.shape}, expected {(n, oh, ow, c)}")
    _check_vectors("depthwise_bn_grad", c, scale=scale, shift=shift, mean=mean)
    extra = _stats_operands("depthwise_bn_grad", dy, stats)
    blocks = min(oh, ROW_BLOCKS)
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct((n, blocks, 9, c), jnp.float32),
        jax.ShapeDtypeStruct((n, h, 2, c), jnp.float32),
    )
    da, dk, sums = jax.ffi.ffi_call(DEPTHWISE_BN_GRAD_TARGET, out)(
        x,
        kernel,
        dy,
        scale,
        shift,
        mean,
        *extra,
        stride=np.int64(stride),
        slope=np.float32(slope),
        stats=np.int64(stats is not None),
    )
    return da, dk.reshape(n, blocks, 3, 3, 1, c), sums


class StatsCotangent(NamedTuple):
    """The part of a layer's output cotangent through the per-image moments its forward wrote
    (mean ``m_n`` and ``M2_n`` over the image's ``P`` pixels), for the BatchNorm after it:
    ``a_n + b_n * (y - m_n)`` with ``a_n = dmean_n / P`` and ``b_n = 2 dM2_n``. ``y`` the layer's
    output; ``coef [N, 3, C]`` per image ``(m_n, a_n, b_n)``."""

    y: jax.Array
    coef: jax.Array


def _stats_operands(what: str, dy: jax.Array, stats: StatsCotangent | None) -> tuple:
    """The kernel's ``z`` and ``coef`` operands: ``stats``' (checked), or placeholders it does not
    read (``dy`` itself and zeros) when there is no statistics' part."""
    if stats is None:
        return dy, jnp.zeros((dy.shape[0], 3, dy.shape[3]), jnp.float32)
    n, c = dy.shape[0], dy.shape[3]
    if stats.y.shape != dy.shape or stats.coef.shape != (n, 3, c):
        raise ValueError(
            f"{what}: stats y {stats.y.shape} / coef {stats.coef.shape}, expected {dy.shape} / "
            f"{(n, 3, c)}"
        )
    return stats.y, stats.coef


def _offsets(layer: ConvLayer) -> dict[str, np.int64]:
    return {
        "w_offset": np.int64(layer.w),
        "b_offset": np.int64(layer.b),
        "s_offset": np.int64(layer.slope),
    }


def _check_pointwise(what: str, x: jax.Array, layer: ConvLayer) -> None:
    if (layer.kernel_size, layer.stride, layer.padding, layer.cin_offset) != (1, 1, 0, 0) or (
        x.ndim != 4 or x.shape[3] != layer.cin
    ):
        raise ValueError(
            f"{what}: expected a 1x1 stride-1 layer reading every channel of x, got x {x.shape}, "
            f"{layer}"
        )


def conv_bn(
    x: jax.Array,
    params: jax.Array,
    layer: ConvLayer,
    scale: jax.Array,
    shift: jax.Array,
    slope: float,
    *,
    moments: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The 1x1 stride-1 ``layer`` on ``leaky_relu(x * scale + shift, slope)``, the activation
    computed row by row inside the kernel and never stored (``x``: a BatchNorm's input). With
    ``moments``, ``(y, moments [N, 2, CO])`` (see :func:`moments`)."""
    _check_pointwise("conv_bn", x, layer)
    _check_vectors("conv_bn", x.shape[3], scale=scale, shift=shift)
    out = jax.ShapeDtypeStruct((*x.shape[:3], layer.cout), jnp.float32)
    call = jax.ffi.ffi_call(CONV_BN_TARGET, _moments_results(out, moments))
    results = call(x, params, scale, shift, **_offsets(layer), slope=np.float32(slope))
    return _with_moments(results, moments)


def conv_bn_grad(
    dy: jax.Array,
    params: jax.Array,
    layer: ConvLayer,
    x: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    mean: jax.Array,
    slope: float,
    stats: StatsCotangent | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of :func:`conv_bn` for the cotangent ``dy``, one pass per block of rows;
    ``layer`` holds the transposed kernel (``dy``'s channels in, ``x``'s out). ``(dx, dkernel,
    sums)``: ``dx`` the BatchNorm's direct input gradient ``scale * g`` (as
    :func:`depthwise_bn_grad`), ``dkernel [N, B, C, CO]`` per image and block of rows
    (``B <= ROW_BLOCKS``, fewer for small images and wide layers), ``sums [N, H, 2, C]`` per row
    the BatchNorm's backward sums ``sum(g)``, ``sum(g * (x - mean))``. The caller sums
    ``dkernel`` and ``sums`` over the batch. ``stats``: as for :func:`depthwise_bn_grad`."""
    _check_pointwise("conv_bn_grad", dy, layer)
    n, h, w, c = x.shape
    if x.shape != (*dy.shape[:3], layer.cout):
        raise ValueError(f"conv_bn_grad: x {x.shape}, expected {(*dy.shape[:3], layer.cout)}")
    _check_vectors("conv_bn_grad", c, scale=scale, shift=shift, mean=mean)
    extra = _stats_operands("conv_bn_grad", dy, stats)
    # per-block kernel gradients at most ~1/16 of the tensors read (XLA sums them: at 20 x 20,
    # 256 -> 256, eight blocks would hand it 16 MB)
    blocks = max(1, min(h, ROW_BLOCKS, h * w * (c + layer.cin) // (16 * c * layer.cin)))
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct((n, blocks, c, layer.cin), jnp.float32),
        jax.ShapeDtypeStruct((n, h, 2, c), jnp.float32),
    )
    return jax.ffi.ffi_call(CONV_BN_GRAD_TARGET, out)(
        dy,
        params,
        x,
        scale,
        shift,
        mean,
        *extra,
        **_offsets(layer),
        slope=np.float32(slope),
        stats=np.int64(stats is not None),
    )


def _check_channels(what: str, x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] % 8 or x.shape[1] * x.shape[2] == 0:
        raise ValueError(
            f"{what}: expected x [N, H, W, C] with C a multiple of 8 and H, W >= 1, got {x.shape}"
        )


def moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per image and channel of ``x [N, H, W, C]``: ``(mean [N, C], M2 [N, C])``, M2 the sum of
    squared deviations from that image's mean: each row's two passes in cache (the mean first, so
    no cancellation at a large common offset), the rows merged in order (Chan et al.). The layer
    kernels that write a BatchNorm's input give the same numbers for their output
    (``moments=True``: ``[N, 2, CO]``, without reading it again); this kernel is for inputs that
    none wrote."""
    _check_channels("moments", x)
    n, c = x.shape[0], x.shape[3]
    out = jax.ffi.ffi_call(MOMENTS_TARGET, jax.ShapeDtypeStruct((n, 2, c), jnp.float32))(x)
    return out[:, 0], out[:, 1]


def bn_grad_sums(
    dy: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    scale: jax.Array | None = None,
    shift: jax.Array | None = None,
    slope: float = NO_ACTIVATION,
) -> tuple[jax.Array, jax.Array]:
    """Per image and channel: ``(sum(g), sum(g * (x - mean)))`` over ``(H, W)`` of NHWC ``dy``
    and ``x`` (``mean [C]``): BatchNorm's backward reductions in one pass.

    ``g = dy`` when ``slope`` is 1; otherwise ``dy`` is the cotangent of a LeakyReLU after the
    BatchNorm ``z = x * scale + shift`` and ``g = dy if z > 0 else slope * dy`` is recomputed
    here (torch's subgradient at 0), so ``g`` is never stored."""
    _check_channels("bn_grad_sums", x)
    c = x.shape[3]
    if slope != NO_ACTIVATION and (scale is None or shift is None):
        raise ValueError("bn_grad_sums: an activation (slope != 1) needs scale and shift")
    # without an activation the kernel ignores scale and shift: any [C] vector fills the slots
    scale = mean if scale is None else scale
    shift = mean if shift is None else shift
    if dy.shape != x.shape or any(v.shape != (c,) for v in (mean, scale, shift)):
        raise ValueError(
            f"bn_grad_sums: dy {dy.shape}, mean {mean.shape}, scale {scale.shape} and shift "
            f"{shift.shape} for x {x.shape} (expected dy like x and [{c}] vectors)"
        )
    out = jax.ffi.ffi_call(
        BN_GRAD_SUMS_TARGET, jax.ShapeDtypeStruct((x.shape[0], 2, c), jnp.float32)
    )(dy, x, mean, scale, shift, slope=np.float32(slope))
    return out[:, 0], out[:, 1]


def weight_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    stats: StatsCotangent | None = None,
    mean: jax.Array | tuple[float, ...] | None = None,
) -> jax.Array:
    """The kernel gradient of a dense ``k x k`` convolution (NHWC ``x``, cotangent ``dy`` with
    ``cout`` a multiple of 8) per image: ``[N, k, k, cin, cout]`` (the caller sums over images).
    ``stats`` (the 3-channel 3x3 stem only): the part of ``dy`` through the statistics of the
    BatchNorm after the layer, added as ``dy`` is read (:class:`StatsCotangent`). A uint8 ``x``
    (the image, for the stem only) is read as ``float32(x) - mean`` (``mean [cin]``), as
    :func:`conv` reads it."""
    n, h, w, c = x.shape
    k, s, p = kernel_size, stride, padding
    expected = (n, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1)
    if x.ndim != 4 or dy.ndim != 4 or dy.shape[:3] != expected or dy.shape[3] % 8:
        raise ValueError(
            f"weight_grad: x {x.shape} and dy {dy.shape} do not fit a {k}x{k} stride-{s} pad-{p} "
            f"convolution with a multiple of 8 output channels (dy [N, OH, OW] {expected})"
        )
    if stats is not None and (k, c) != (3, 3):
        raise ValueError(
            f"weight_grad: stats is supported for the 3-channel 3x3 stem only, got a {k}x{k} "
            f"kernel over {c} channels"
        )
    extra = _stats_operands("weight_grad", dy, stats)
    out = jax.ShapeDtypeStruct((n, k, k, c, dy.shape[3]), jnp.float32)
    image = ()
    if x.dtype == jnp.uint8:
        mean_shape = None if mean is None else np.shape(mean)
        if (k, c) != (3, 3) or mean_shape != (c,):
            raise ValueError(
                f"weight_grad: a uint8 x needs the 3-channel 3x3 stem and a mean of 3 values, got "
                f"a {k}x{k} kernel over {c} channels and mean of shape {mean_shape}"
            )
        image = (jnp.asarray(mean, jnp.float32),)
    return jax.ffi.ffi_call(WEIGHT_GRAD_U8_TARGET if image else WEIGHT_GRAD_TARGET, out)(
        x,
        *image,
        dy,
        *extra,
        k=np.int64(k),
        stride=np.int64(s),
        pad=np.int64(p),
        stats=np.int64(stats is not None),
    )
