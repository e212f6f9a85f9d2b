"""2-D convolution for the XLA and native CPU paths: ``models.conv``'s formulations with
training-friendly VJPs, and the native train-step kernels where they apply.

On CPU (``lax.platform_dependent``, decided at lowering; ``impl`` forces one form for tests)
``models.conv.cpu_conv2d``'s formulations run with custom VJPs:
- the depthwise taps keep only the input as residual (autodiff would store the k*k shifted
  views) and compute the kernel gradient with ``channel_sums``;
- the 1x1 matmul's weight gradient is one 2-D ``x.T @ g`` (autodiff's 4-D contraction lowers far
  worse on XLA CPU);
- the narrow stem's gradients are XLA's convolution's;
other dense convolutions, forward and both gradients, are XLA's. That last choice assumes the
program is compiled with ``retinaface_jax.compiler_options()`` (as the detector's and the train
step's are), which keeps XLA's own convolution kernels. Inside a native train step
(``native_training.native_gradients``) the 3x3 depthwise and the dense convolutions with their
gradients run on the native kernels instead. On GPU/TPU ``lax.conv`` is used unchanged. All
forms compute the same function with the same parameters.

Autodiff contract: values and first-order gradients equal ``lax.conv``'s (``tests/test_conv_ops.py``);
reverse mode only (custom VJPs; their backward passes are plain JAX, so differentiable again).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from retinaface_jax.backends.native import native_training
from retinaface_jax.backends.xla_cpu.reductions import channel_sums
from retinaface_jax.models.conv import (
    MIN_TAP_CHANNELS,
    conv_depthwise,
    conv_narrow,
    conv_xla,
    depthwise_nhwc,
    pad,
    pointwise,
    strided,
    tap_sum,
    taps,
)
from retinaface_jax.models.mean_subtraction import subtract_mean

_IMPLS = ("auto", "xla", "taps")


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
    x: jax.Array | ImageWithMean,
    kernel: jax.Array,
    stride: int,
    padding: int,
    groups: int,
    impl: str = "auto",
) -> jax.Array:
    """``y = conv(x, kernel)`` with torch semantics (cross-correlation), NHWC / HWIO. ``impl``:
    ``'auto'`` (the CPU forms when lowered for CPU, else XLA's), ``'taps'`` or ``'xla'``."""
    return _conv2d(x, kernel, stride, padding, groups, moments=False, impl=impl)


def conv2d_with_stats(
    x: jax.Array | ImageWithMean, kernel: jax.Array, stride: int, padding: int, groups: int
) -> tuple[jax.Array, native_training.Stats | None]:
    """``(conv2d(...), its output's batch mean and biased variance per channel)``: the statistics
    where a native train-step kernel runs the convolution and computes them row by row as it
    writes the output (without gradient: for the BatchNorm that follows, which then makes no pass
    of its own over the output), else None."""
    result = _conv2d(x, kernel, stride, padding, groups, moments=True, impl="auto")
    return result if isinstance(result, tuple) else (result, None)


def _conv2d(x, kernel, stride, padding, groups, *, moments, impl):
    """:func:`conv2d`; ``moments``: ``(y, stats)`` from the native kernels that give them."""
    if impl not in _IMPLS:
        raise ValueError(f"conv impl: expected one of {_IMPLS}, got {impl!r}")
    if isinstance(x, ImageWithMean):
        if groups == 1 and native_training.dense_image_applies(x.pixels, kernel):
            return native_training.dense(
                x.pixels, kernel, stride, padding, moments=moments, mean=x.mean
            )
        x = x.materialize()
    if native_training.active():  # a CPU train step by construction
        return _conv_cpu(x, kernel, stride, padding, groups, moments)
    if impl == "xla":
        return conv_xla(x, kernel, stride, padding, groups)
    if impl == "taps":
        return _conv_cpu(x, kernel, stride, padding, groups, False)
    return lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x, k: _conv_cpu(x, k, stride, padding, groups, False),
        default=lambda x, k: conv_xla(x, k, stride, padding, groups),
    )


def _conv_cpu(x, kernel, stride, padding, groups, moments):
    """``models.conv.cpu_conv2d`` with this module's VJPs, or a native kernel where it applies."""
    kh, kw, cin_g, cout = kernel.shape
    cin = x.shape[-1]
    if groups == 1:
        if native_training.dense_applies(x, kernel, stride, padding):
            return native_training.dense(x, kernel, stride, padding, moments=moments)
        if kh == kw == 1:
            return _pointwise(strided(pad(x, padding), stride), kernel[0, 0])
        if cin >= MIN_TAP_CHANNELS:
            return conv_xla(x, kernel, stride, padding, 1)
        return _conv_narrow(x, kernel, stride, padding)
    if groups == cin == cout and cin_g == 1:
        if native_training.depthwise_applies(x, kernel, stride, padding):
            return native_training.depthwise(x, kernel, stride, moments=moments)
        return _conv_depthwise_taps(x, kernel, stride, padding)
    return conv_xla(x, kernel, stride, padding, groups)


@jax.custom_vjp
def _pointwise(x, w):
    return pointwise(x, w)


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


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_depthwise_taps(x, kernel, stride, padding):
    """``models.conv.conv_depthwise`` (flattened rows for narrow inputs when not differentiated;
    training keeps the NHWC loop, with which the step was faster)."""
    return conv_depthwise(x, kernel, stride, padding)


def _conv_depthwise_fwd(x, kernel, stride, padding):
    return depthwise_nhwc(x, kernel, stride, padding), (x, kernel)


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
    dx = tap_sum(taps(gd, kh, kw, 1, 0), flipped)
    views = [view for _, _, view in taps(x, kh, kw, stride, padding)]
    dk = channel_sums(lambda rows: [v[:, rows] * g[:, rows] for v in views], ho)
    return dx, jnp.stack(dk).reshape(kernel.shape)


_conv_depthwise_taps.defvjp(_conv_depthwise_fwd, _conv_depthwise_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_narrow(x, kernel, stride, padding):
    return conv_narrow(x, kernel, stride, padding)


def _conv_narrow_fwd(x, kernel, stride, padding):
    return _conv_narrow(x, kernel, stride, padding), (x, kernel)


def _conv_narrow_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda x_, k_: conv_xla(x_, k_, stride, padding, 1), x, kernel)
    return vjp(g)


_conv_narrow.defvjp(_conv_narrow_fwd, _conv_narrow_bwd)
