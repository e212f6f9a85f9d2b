"""The model's layers as the CPU backends run them: functions over the plain modules of
``retinaface_jax.models`` (their parameters and running statistics), with custom VJPs.

- :func:`batch_norm` (training: :func:`batch_norm_train`): BatchNorm -> LeakyReLU as one layer.
  Its VJP is the textbook backward, two reductions and one elementwise pass with the activation's
  mask recomputed, where autodiff through the two-pass variance made about twice as many
  reductions; each per-channel sum goes through ``reductions.channel_sums`` or a native kernel.
- :func:`conv_with_stats`: a convolution that, inside a native train step, also returns its
  output's batch statistics (written by the kernel row by row) for the BatchNorm after it.
- :func:`batch_norm_into_conv`: BatchNorm -> LeakyReLU read through by the next 3x3 depthwise
  or 1x1 layer's native kernels (:func:`batch_norm_conv_train`): the activation is never stored.
- :func:`add_bias`: ``y + bias`` with the bias gradient by ``channel_sums``.

Autodiff contract: values and first-order gradients equal the reference model's (tests); no
forward mode (custom VJPs), and differentiating a BatchNorm's backward again raises
(:func:`first_order_only`) instead of returning wrong second derivatives. Use the reference
model, which is differentiable to any order. Which kernels run is decided by the caller: the native ones only inside
``native_training.native_gradients`` (entered by the train step).
``region``: a padded batch's valid region, zeroed before every padded convolution.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from retinaface_jax.backends.native import native_training
from retinaface_jax.backends.native.native_training import Stats
from retinaface_jax.backends.native.ops import NO_ACTIVATION
from retinaface_jax.backends.padded_region import PaddedRegion, mask_padded
from retinaface_jax.backends.xla_cpu.conv_ops import conv2d, conv2d_with_stats
from retinaface_jax.backends.xla_cpu.reductions import channel_sums
from retinaface_jax.models import layers
from retinaface_jax.models.layers import BatchNorm2d, Conv2d


def conv_with_stats(
    layer: Conv2d, x: jax.Array, region: PaddedRegion | None = None
) -> tuple[jax.Array, Stats | None]:
    """``(layer(x), the output's batch statistics)``: given where a native train-step kernel
    computes them while writing the output (no bias), else None. The BatchNorm after this layer
    takes them. The input is masked for ``region`` when the layer pads it."""
    if region is not None and layer.padding > 0 and not isinstance(x, tuple):
        x = mask_padded(x, region)
    kernel, args = layer.kernel[...], (layer.stride, layer.padding, layer.groups)
    if layer.bias is None and native_training.active():
        return conv2d_with_stats(x, kernel, *args)
    y = conv2d(x, kernel, *args)
    return (y if layer.bias is None else add_bias(y, layer.bias[...])), None


def batch_norm(
    norm: BatchNorm2d, x: jax.Array, activation: float | None = None, stats: Stats | None = None
) -> jax.Array:
    """``leaky_relu(norm(x), activation)`` (None: no activation; 0: ReLU). In training its
    backward recomputes the activation's mask from ``x`` instead of storing another full-size
    tensor; ``stats``: ``x``'s batch statistics if the layer that wrote ``x`` gave them."""
    slope = NO_ACTIVATION if activation is None else float(activation)
    scale, bias = norm.scale[...], norm.bias[...]
    if norm.use_running_average:
        inv = jax.lax.rsqrt(norm.var[...] + norm.eps)
        return leaky_relu(_affine(x, norm.mean[...], inv, scale, bias), slope)
    y, mean, var = batch_norm_train(x, scale, bias, norm.eps, slope, stats=stats)
    norm.update_running(mean, var, math.prod(x.shape[:-1]))
    return y


def batch_norm_into_conv(
    norm: BatchNorm2d,
    x: jax.Array,
    activation: float,
    layer: Conv2d,
    stats: Stats | None = None,
    region: PaddedRegion | None = None,
) -> tuple[jax.Array, Stats | None]:
    """``conv_with_stats(layer, batch_norm(norm, x, activation, stats))``.

    In a native train step, when ``layer`` is a 3x3 depthwise layer (padding 1) or a 1x1
    stride-1 layer without bias, the activation is never stored: the layer's kernels read ``x``
    and normalise it row by row as they go, and the layer's input gradient comes with this
    BatchNorm's backward sums (:func:`batch_norm_conv_train`). Elsewhere the two one after the
    other.
    """
    kernel, stride, padding = layer.kernel[...], layer.stride, layer.padding
    if layer.groups > 1:
        consumer = "depthwise"
        fits = layer.groups == x.shape[-1] == layer.out_channels
        fits = fits and native_training.depthwise_applies(x, kernel, stride, padding)
    else:
        consumer = "pointwise"
        fits = native_training.pointwise_bn_applies(x, kernel, stride, padding)
    if norm.use_running_average or layer.bias is not None or not fits or region is not None:
        return conv_with_stats(layer, batch_norm(norm, x, activation, stats), region)
    scale, bias = norm.scale[...], norm.bias[...]
    y, mean, var, y_stats = batch_norm_conv_train(
        x, scale, bias, kernel, norm.eps, activation, consumer, stride, stats=stats
    )
    norm.update_running(mean, var, math.prod(x.shape[:-1]))
    return y, y_stats


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` for NHWC ``y``, the bias gradient summed by ``reductions.channel_sums``:
    XLA's CPU reduction of the heads' large cotangent (a reduce-window) is slow."""
    return _add_bias(y, bias)


@jax.custom_vjp
def _add_bias(y, bias):
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, g):
    (d_bias,) = channel_sums(lambda rows: [g[:, rows]], g.shape[1])
    return g, d_bias


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def leaky_relu(x: jax.Array, slope: float) -> jax.Array:
    """``models.layers.leaky_relu``, with ``NO_ACTIVATION`` (slope 1) the identity."""
    return x if slope == NO_ACTIVATION else layers.leaky_relu(x, slope)


def _scale_shift(mean, inv, scale, bias):
    """``(k, c)`` per channel with ``(x - mean) * inv * scale + bias == x * k + c``."""
    k = inv * scale
    return k, bias - mean * k


def _affine(x, mean, inv, scale, bias):
    """``(x - mean) * inv * scale + bias`` written as one multiply-add per element."""
    k, c = _scale_shift(mean, inv, scale, bias)
    return x * k + c


def _batch_stats(x):
    """Batch mean and biased variance per channel (two passes: the mean, then squared deviations)."""
    if x.ndim != 4:
        raise ValueError(f"BatchNorm2d: expected an NHWC input, got shape {x.shape}")
    if native_training.batch_norm_applies(x):
        return native_training.batch_moments(x)
    h, n = x.shape[1], math.prod(x.shape[:-1])
    (total,) = channel_sums(lambda rows: [x[:, rows]], h)
    mean = total / n
    (squares,) = channel_sums(lambda rows: [jnp.square(x[:, rows] - mean)], h)
    return mean, squares / n


def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    eps: float,
    slope: float = NO_ACTIVATION,
    *,
    stats: Stats | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm of NHWC ``x``, then ``leaky_relu(., slope)`` (1: none):
    ``(y, batch mean, biased variance)`` per channel. ``stats``: that mean and variance if
    already known (from the kernel that wrote ``x``), else computed here.

    The custom VJP is the textbook backward: two full-size reductions (``sum(g)`` and
    ``sum(g * xhat)``) and one elementwise pass. Autodiff through the two-pass variance produced
    about twice as many reductions over the activation, a large part of a CPU train step. The
    activation's input gradient ``g`` is recomputed from ``x`` inside both passes, never stored.
    Every per-channel sum goes through ``reductions.channel_sums`` or the native kernel. The
    statistics' dependence on ``x`` is part of that backward, so they enter without gradient.
    """
    mean, var = _stats_of(x, stats)
    return _batch_norm(x, mean, var, scale, bias, eps, float(slope))


def _stats_of(x: jax.Array, stats: Stats | None) -> Stats:
    """``stats`` or ``x``'s batch statistics, without gradient (the custom VJPs below
    differentiate through ``x``)."""
    if stats is None:
        return _batch_stats(jax.lax.stop_gradient(x))  # (a kernel call has no JVP rule)
    return jax.lax.stop_gradient(stats)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _batch_norm(x, mean, var, scale, bias, eps, slope):
    return _batch_norm_fwd(x, mean, var, scale, bias, eps, slope)[0]


def _batch_norm_fwd(x, mean, var, scale, bias, eps, slope):
    inv = jax.lax.rsqrt(var + eps)
    y = leaky_relu(_affine(x, mean, inv, scale, bias), slope)
    return (y, mean, var), (x, mean, inv, scale, bias)


def _no_stats_cotangent(mean: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cotangents of the statistics given as inputs: zero (they enter without gradient)."""
    return jnp.zeros_like(mean), jnp.zeros_like(mean)


def _batch_norm_bwd(eps, slope, residuals, cotangents):
    x, mean, inv, scale, bias = residuals
    dy, g_mean, g_var = cotangents
    k, c = _scale_shift(mean, inv, scale, bias)
    if native_training.batch_norm_applies(x):
        sums = native_training.batch_norm_grad_sums(dy, x, mean, k, c, slope)
    else:
        xc = x - mean

        def g(rows):
            return _activation_cotangent(dy[:, rows], x[:, rows] * k + c, slope)

        sums = channel_sums(lambda rows: [g(rows), g(rows) * xc[:, rows]], x.shape[1])
    dx, d_scale, d_bias = _batch_norm_input_grad(dy, x, mean, inv, k, c, slope, sums, g_mean, g_var)
    dx, d_scale, d_bias = first_order_only((dx, d_scale, d_bias))
    return dx, *_no_stats_cotangent(mean), d_scale, d_bias


@jax.custom_jvp
def first_order_only(tree):
    """The identity, but differentiating it raises: marks a backward pass that is right only
    to first order (here the batch statistics enter without gradient, so autodiff through it
    would silently give wrong second derivatives)."""
    return tree


@first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise NotImplementedError(
        "the CPU train paths' BatchNorm gives first-order gradients only; for higher-order "
        "derivatives differentiate the reference model, model(x) (train step: kernels='reference')"
    )


def _activation_cotangent(dy, z, slope):
    """The cotangent of ``z`` given that of ``leaky_relu(z, slope)``: ``dy`` masked by ``z > 0``."""
    return dy if slope == NO_ACTIVATION else jnp.where(z > 0, dy, dy * slope)


def _batch_norm_input_grad(dy, x, mean, inv, k, c, slope, sums, g_mean, g_var):
    """``(dx, dscale, dbias)`` of BatchNorm -> ``leaky_relu(., slope)`` from the output's
    cotangent ``dy`` and the backward sums ``(sum(g), sum(g * (x - mean)))`` over the batch."""
    d_bias, d_scale = sums
    d_scale = d_scale * inv
    n = math.prod(x.shape[:-1])
    xc = x - mean
    # d/dx of y (through mean and variance), plus the (usually zero) cotangents of the statistics
    g = _activation_cotangent(dy, x * k + c, slope)
    dx = k * (g - (d_bias + xc * (inv * d_scale)) / n)
    dx = dx + (g_mean + 2.0 * g_var * xc) / n
    return dx, d_scale, d_bias


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm_conv_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    kernel: jax.Array,
    eps: float,
    slope: float,
    consumer: str,
    stride: int = 1,
    *,
    stats: Stats | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, Stats]:
    """Training-mode BatchNorm of NHWC ``x``, ``leaky_relu(., slope)``, then the ``consumer``
    convolution with ``kernel``: ``'depthwise'`` (3x3, padding 1, ``[3, 3, 1, C]``) or
    ``'pointwise'`` (1x1, stride 1, ``[1, 1, C, CO]``). Returns ``(y, batch mean, biased
    variance, y's batch statistics)``, the last from the convolution's kernel, for the
    BatchNorm after it. ``stats``: as for :func:`batch_norm_train`.

    For the native CPU kernels only (``native_training.depthwise_applies`` /
    ``pointwise_bn_applies``): the activation is computed inside the convolution's kernels and
    never stored, and the BatchNorm's backward sums come from the kernel of the convolution's
    input gradient. Same function and gradients as the two layers one after the other.

    The statistics keep their gradient here (``stats`` from the kernel that wrote ``x``, else
    ``native_training.batch_moments``): this layer's backward gives ``x`` only the BatchNorm's
    direct input gradient and hands the mean's and variance's cotangents back, and the kernel
    that wrote ``x`` adds their part as it reads ``x``'s cotangent. XLA's separate pass for the
    BatchNorm's full input gradient is gone; the kernels' extra reads cost less than it did.
    """
    if consumer not in _CONSUMERS:
        raise ValueError(f"batch_norm_conv_train: consumer must be one of {_CONSUMERS}")
    mean, var = native_training.batch_moments(x) if stats is None else stats
    y, y_moments = _bn_conv(x, mean, var, scale, bias, kernel, eps, float(slope), consumer, stride)
    y_stats = native_training.stats_from_images(
        y_moments[:, 0], y_moments[:, 1], y.shape[1] * y.shape[2]
    )
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), y_stats


_CONSUMERS = ("depthwise", "pointwise")


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _bn_conv(x, mean, var, scale, bias, kernel, eps, slope, consumer, stride):
    """``(y, y's per-image moments [N, 2, C])`` with the partial derivatives for ``x``, ``mean``
    and ``var`` taken apart (the statistics' dependence on ``x`` is their producer's)."""
    inv = jax.lax.rsqrt(var + eps)
    k, c = _scale_shift(mean, inv, scale, bias)
    return native_training.batch_norm_into(consumer, x, kernel, k, c, slope, stride)


def _bn_conv_fwd(x, mean, var, scale, bias, kernel, eps, slope, consumer, stride):
    x, mean, var, scale, bias, kernel = (a.value for a in (x, mean, var, scale, bias, kernel))
    y, m = _bn_conv(x, mean, var, scale, bias, kernel, eps, slope, consumer, stride)
    return (y, m), (x, mean, jax.lax.rsqrt(var + eps), scale, bias, kernel, y, m)


def _bn_conv_bwd(eps, slope, consumer, stride, residuals, cotangents):
    """The partials: ``x`` gets ``k * g`` (``g`` the cotangent of the BatchNorm's output before
    the activation), ``mean`` ``-k sum(g)`` and ``var`` ``-scale inv^3 sum(g (x - mean)) / 2``
    (``inv = 1 / sqrt(var + eps)``, ``k = scale * inv``); ``dy`` comes with the part through
    ``y``'s own moments (``native_training.stats_cotangent``), which the kernel adds."""
    x, mean, inv, scale, bias, kernel, y, m = residuals
    dy, dm = cotangents
    k, c = _scale_shift(mean, inv, scale, bias)
    dy = native_training.instantiate_cotangent(dy)
    dx, dkernel, (sum_g, sum_gx) = native_training.batch_norm_into_grad(
        consumer,
        x,
        kernel,
        dy,
        k,
        c,
        mean,
        slope,
        stride,
        native_training.stats_cotangent(y, m, dm),
    )
    d_var = -0.5 * scale * inv**3 * sum_gx
    return dx, -k * sum_g, d_var, sum_gx * inv, sum_g, dkernel


_bn_conv.defvjp(_bn_conv_fwd, _bn_conv_bwd, symbolic_zeros=True)
