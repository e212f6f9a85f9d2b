"""2-D convolution (NHWC input, HWIO kernel, explicit padding) with a per-backend formulation.

XLA's CPU convolutions are slow for some of the shapes RetinaFace uses, grouped (depthwise)
convolution in particular. On CPU we therefore write
- a depthwise k x k convolution as k*k shifted multiply-adds, with a custom VJP that keeps only
  the input as residual (autodiff would store the k*k shifted views); at inference, inputs of at
  most 8 channels at stride 1 run on flattened rows (see ``_conv_depthwise_taps``),
- a 1 x 1 convolution as a matmul (einsum), with its weight gradient as one 2-D matmul,
- a dense convolution of a narrow input (the 3-channel stem) as k*k*C broadcast multiply-adds
  (one fused loop, faster than XLA's forward), with XLA's gradients,
and leave other dense convolutions, forward and both gradients, to XLA. That last choice assumes
the program is compiled with ``retinaface_jax.compiler_options()`` (as the detector's and the
train step's are), which keeps XLA's own convolution kernels: with those options XLA's gradients
for every dense convolution and plain ``x.T @ g`` 1x1 weight gradients make a faster train step
than per-tap and blocked matmuls (under XLA's default YNNPACK kernels the opposite holds).
Inside a CPU train step (``native_training.native_gradients``) the 3x3 depthwise and the dense
convolutions (1x1 included) with their gradients run on the native kernels instead. All
formulations compute the same function with the same parameters. On GPU/TPU ``lax.conv`` is the
fast path and is used unchanged. ``set_conv_impl`` forces one formulation (tests compare both).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from retinaface_jax.backends.native import native_training
from retinaface_jax.backends.xla_cpu.reductions import channel_sums
from retinaface_jax.mean_subtraction import subtract_mean

_IMPLS = ("auto", "xla", "taps")
_MIN_TAP_CHANNELS = 16  # narrower inputs (the RGB stem) use _conv_narrow
_MAX_FLAT_CHANNELS = 8  # stride-1 depthwise convolutions this narrow run on flattened rows
_impl = "auto"


def set_conv_impl(impl: str) -> None:
    """Choose the formulation: ``'auto'`` (taps on CPU, XLA elsewhere), ``'xla'`` or ``'taps'``.

    Takes effect for functions traced afterwards.
    """
    global _impl
    if impl not in _IMPLS:
        raise ValueError(f"conv impl: expected one of {_IMPLS}, got {impl!r}")
    _impl = impl


def get_conv_impl() -> str:
    """The formulation that will be used when tracing now (``'xla'`` or ``'taps'``)."""
    if _impl == "auto":
        return "taps" if jax.default_backend() == "cpu" else "xla"
    return _impl


class ImageWithMean(NamedTuple):
    """A uint8 BGR image batch ``[B, H, W, 3]`` for the first convolution, which subtracts
    ``mean`` (``float32(pixels) - mean``: the original's normalisation, one float32 rounding).
    Inside a native CPU train step the RGB stem's kernels read it as it is
    (``native_training.dense_image_applies``: the uint8 image is a quarter of the float32 one's
    bytes, and XLA's conversion pass is gone); elsewhere it becomes the float32 image first."""

    pixels: jax.Array
    mean: tuple[float, ...]

    def materialize(self) -> jax.Array:
        """The float32 image minus the mean."""
        return subtract_mean(self.pixels, self.mean)


def conv2d(
    x: jax.Array | ImageWithMean, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    """``y = conv(x, kernel)`` with torch semantics (cross-correlation), NHWC / HWIO."""
    return _conv2d(x, kernel, stride, padding, groups, moments=False)


def conv2d_with_stats(
    x: jax.Array | ImageWithMean, kernel: jax.Array, stride: int, padding: int, groups: int
) -> tuple[jax.Array, native_training.Stats | None]:
    """``(conv2d(...), its output's batch mean and biased variance per channel)``: the statistics
    where a native train-step kernel runs the convolution and computes them row by row as it
    writes the output (without gradient: for the BatchNorm that follows, which then makes no pass
    of its own over the output), else None."""
    result = _conv2d(x, kernel, stride, padding, groups, moments=True)
    return result if isinstance(result, tuple) else (result, None)


def _conv2d(x, kernel, stride, padding, groups, *, moments):
    """:func:`conv2d`; ``moments``: ``(y, stats)`` from the native kernels that give them."""
    if isinstance(x, ImageWithMean):
        if groups == 1 and native_training.dense_image_applies(x.pixels, kernel):
            return native_training.dense(
                x.pixels, kernel, stride, padding, moments=moments, mean=x.mean
            )
        x = x.materialize()
    if get_conv_impl() == "xla":
        return _conv_xla(x, kernel, stride, padding, groups)
    kh, kw, cin_g, cout = kernel.shape
    cin = x.shape[-1]
    if groups == 1:
        if native_training.dense_applies(x, kernel, stride, padding):
            return native_training.dense(x, kernel, stride, padding, moments=moments)
        if kh == kw == 1:
            xs = x[:, ::stride, ::stride, :] if stride > 1 else x
            if padding:
                xs = _pad(x, padding)[:, ::stride, ::stride, :]
            return _pointwise(xs, kernel[0, 0])
        if cin >= _MIN_TAP_CHANNELS:
            return _conv_xla(x, kernel, stride, padding, 1)
        return _conv_narrow(x, kernel, stride, padding)
    if groups == cin == cout and cin_g == 1:
        if native_training.depthwise_applies(x, kernel, stride, padding):
            return native_training.depthwise(x, kernel, stride, moments=moments)
        return _conv_depthwise_taps(x, kernel, stride, padding)
    return _conv_xla(x, kernel, stride, padding, groups)


@jax.custom_vjp
def _pointwise(x, w):
    """1x1 convolution ``[B, H, W, C] x [C, O]`` as a matmul."""
    return jnp.einsum("bhwc,co->bhwo", x, w)


def _pointwise_fwd(x, w):
    return _pointwise(x, w), (x, w)


def _pointwise_bwd(residuals, g):
    """The weight gradient as one 2-D ``x.T @ g``.

    Autodiff of the einsum contracts the three leading axes of the 4-D operands instead, which
    XLA's CPU backend lowers far worse (a markedly slower train step).
    """
    x, w = residuals
    dw = x.reshape(-1, w.shape[0]).T @ g.reshape(-1, w.shape[1])
    return jnp.einsum("bhwo,co->bhwc", g, w), dw


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def _conv_xla(x, kernel, stride, padding, groups):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def _pad(x: jax.Array, p: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


def _taps(x: jax.Array, kh: int, kw: int, stride: int, padding: int):
    """Yield ``(i, j, view)``: the input window each kernel tap sees, at output resolution."""
    xp = _pad(x, padding)
    hp, wp = xp.shape[1], xp.shape[2]
    ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    for i in range(kh):
        for j in range(kw):
            view = lax.slice(
                xp,
                (0, i, j, 0),
                (xp.shape[0], i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, xp.shape[3]),
                (1, stride, stride, 1),
            )
            yield i, j, view


def _tap_sum(views, kernel):
    """``sum(view * kernel[i, j, 0])`` over the taps ``(i, j, view)``: one fused loop."""
    out = None
    for i, j, view in views:
        term = view * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def _flat_rows(kernel_rows: jax.Array, n: int) -> jax.Array:
    """``[T, C] -> [T, n * C]``: each row repeated ``n`` times, as a product with a 0/1 matrix.

    A broadcast would be fused into its consumer and indexed modulo ``C`` there, which keeps
    LLVM from vectorising the loop; a dot is always materialised (and exact: one term is
    ``k * 1``, the others ``k * 0``).
    """
    c = kernel_rows.shape[1]
    tile = jnp.asarray(np.tile(np.eye(c), (1, n)), kernel_rows.dtype)
    return jnp.dot(kernel_rows, tile, precision=lax.Precision.HIGHEST)


def _flat_taps(xp: jax.Array, kh: int, kw: int):
    """Yield ``(i, j, view)`` of a padded input for a stride-1 ``kh x kw`` window, each view
    ``[B, Ho, Wo * C]``: the image rows flattened, so a tap is one contiguous slice per row."""
    b, hp, wp, c = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    flat = xp.reshape(b, hp, wp * c)
    for i in range(kh):
        for j in range(kw):
            yield i, j, lax.slice(flat, (0, i, j * c), (b, i + ho, j * c + wo * c))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_depthwise_taps(x, kernel, stride, padding):
    """The depthwise convolution when not differentiated (inference).

    With few channels and stride 1 it runs on flattened rows (``_flat_taps``): XLA's CPU loop
    over ``[B, H, W, 8]`` vectorises along ``W`` with 8x8 shuffles, much slower than the flat
    loop. Wider
    inputs are faster as they are. Both forms add the same products in the same order, so the
    results are bit-identical; training (``_conv_depthwise_fwd``) keeps the NHWC loop, because
    there the flat form made the step slower.
    """
    kh, kw, _, c = kernel.shape
    if stride != 1 or c > _MAX_FLAT_CHANNELS:
        return _depthwise_nhwc(x, kernel, stride, padding)
    xp = _pad(x, padding)
    b, hp, wp, _ = xp.shape
    wo = wp - kw + 1
    rows = _flat_rows(kernel.reshape(kh * kw, c), wo).reshape(kh, kw, 1, wo * c)
    return _tap_sum(_flat_taps(xp, kh, kw), rows).reshape(b, hp - kh + 1, wo, c)


def _depthwise_nhwc(x, kernel, stride, padding):
    kh, kw = kernel.shape[:2]
    return _tap_sum(_taps(x, kh, kw, stride, padding), kernel)


def _conv_depthwise_fwd(x, kernel, stride, padding):
    return _depthwise_nhwc(x, kernel, stride, padding), (x, kernel)


def _conv_depthwise_bwd(stride, padding, residuals, g):
    """Both gradients as tap loops, keeping only ``x`` as residual.

    Plain autodiff of the forward would store the nine shifted views of ``x`` (nine copies of the
    activation) from the forward to the backward pass. Here ``dx`` is the depthwise convolution
    of ``g`` (dilated by the stride, padded by ``k - 1 - padding``) with the flipped kernel, and
    ``dkernel[i, j]`` is the sum over batch and space of ``view_ij * g``, computed by
    ``channel_sums`` so the views and products are never stored.
    """
    # The barrier keeps XLA from merging these views with the forward's (CSE), which would
    # compute them during the forward pass and keep all nine alive until this point.
    x, kernel = lax.optimization_barrier(residuals)
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1], x.shape[2]
    ho, wo = g.shape[1], g.shape[2]
    lo_h, lo_w = kh - 1 - padding, kw - 1 - padding
    gd = lax.pad(
        g,
        jnp.zeros((), g.dtype),
        (
            (0, 0, 0),
            (lo_h, h + kh - 1 - lo_h - (stride * (ho - 1) + 1), stride - 1),
            (lo_w, w + kw - 1 - lo_w - (stride * (wo - 1) + 1), stride - 1),
            (0, 0, 0),
        ),
    )
    flipped = kernel[::-1, ::-1]
    dx = _tap_sum(_taps(gd, kh, kw, 1, 0), flipped)
    views = [view for _, _, view in _taps(x, kh, kw, stride, padding)]
    dk = channel_sums(lambda rows: [v[:, rows] * g[:, rows] for v in views], ho)
    return dx, jnp.stack(dk).reshape(kernel.shape)


_conv_depthwise_taps.defvjp(_conv_depthwise_fwd, _conv_depthwise_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_narrow(x, kernel, stride, padding):
    kh, kw, cin, _ = kernel.shape
    out = None
    for i, j, view in _taps(x, kh, kw, stride, padding):
        for c in range(cin):
            term = view[..., c : c + 1] * kernel[i, j, c]
            out = term if out is None else out + term
    return out


def _conv_narrow_fwd(x, kernel, stride, padding):
    return _conv_narrow(x, kernel, stride, padding), (x, kernel)


def _conv_narrow_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x_, k_: _conv_xla(x_, k_, stride, padding, 1), x, kernel)
    return vjp(g)


_conv_narrow.defvjp(_conv_narrow_fwd, _conv_narrow_bwd)
