"""Primitive layers with PyTorch semantics: ``Conv2d``, ``BatchNorm2d``, ``LeakyReLU``, ``Linear``.

NHWC activations, HWIO kernels, explicit integer padding. The convolution arithmetic lives in
``conv_ops`` so the formulation can be chosen per backend without touching parameters.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from retinaface_jax.models.conv_ops import conv2d
from retinaface_jax.models.reductions import channel_sums


def _uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Conv2d(nnx.Module):
    """``torch.nn.Conv2d`` in NHWC: kernel ``[kh, kw, in/groups, out]``, explicit padding.

    Initialised like torch: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        *,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"Conv2d: channels {in_channels}->{out_channels} not divisible by groups={groups}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.groups = padding, groups
        fan_in = in_channels // groups * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        self.kernel = nnx.Param(_uniform(rngs.params(), shape, bound))
        self.bias = nnx.Param(_uniform(rngs.params(), (out_channels,), bound)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(x, self.kernel[...], self.stride, self.padding, self.groups)
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis.

    Training mode normalises with the biased batch variance and updates the running variance with
    the unbiased one, as torch does. ``momentum`` is in the flax convention
    (``running = momentum * running + (1 - momentum) * batch``; torch's 0.1 is 0.9 here).
    Statistics are reduced over every axis but the last; under a ``('data',)`` mesh XLA makes that a
    global (all-device) reduction, so results do not depend on the device count.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
            return _affine(x, mean, jax.lax.rsqrt(var + self.eps), self.scale[...], self.bias[...])
        y, mean, var = batch_norm_train(x, self.scale[...], self.bias[...], self.eps)
        n = math.prod(x.shape[:-1])
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        self.var[...] = m * self.var[...] + (1 - m) * unbiased
        return y


def _affine(x, mean, inv, scale, bias):
    """``(x - mean) * inv * scale + bias`` written as one multiply-add per element."""
    k = inv * scale
    return x * k + (bias - mean * k)


def _batch_stats(x):
    """Batch mean and biased variance per channel (two passes: the mean, then squared deviations)."""
    if x.ndim != 4:
        raise ValueError(f"BatchNorm2d: expected an NHWC input, got shape {x.shape}")
    h, n = x.shape[1], math.prod(x.shape[:-1])
    (total,) = channel_sums(lambda rows: [x[:, rows]], h)
    mean = total / n
    (squares,) = channel_sums(lambda rows: [jnp.square(x[:, rows] - mean)], h)
    return mean, squares / n


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps: float):
    """Training-mode BatchNorm of NHWC ``x``: ``(y, batch mean, biased variance)`` per channel.

    The custom VJP is the textbook backward: two full-size reductions (``sum(g)`` and
    ``sum(g * xhat)``) and one elementwise pass. Autodiff through the two-pass variance produced
    about twice as many reductions over the activation, a large part of a CPU train step. Every
    per-channel sum goes through ``reductions.channel_sums``.
    """
    return _batch_norm_fwd(x, scale, bias, eps)[0]


def _batch_norm_fwd(x, scale, bias, eps):
    mean, var = _batch_stats(x)
    inv = jax.lax.rsqrt(var + eps)
    return (_affine(x, mean, inv, scale, bias), mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(eps, residuals, cotangents):
    x, mean, inv, scale = residuals
    g, g_mean, g_var = cotangents
    n = math.prod(x.shape[:-1])
    xc = x - mean
    d_bias, d_scale = channel_sums(lambda rows: [g[:, rows], g[:, rows] * xc[:, rows]], x.shape[1])
    d_scale = d_scale * inv
    # d/dx of y (through mean and variance), plus the (usually zero) cotangents of the statistics
    dx = (scale * inv) * (g - (d_bias + xc * (inv * d_scale)) / n)
    dx = dx + (g_mean + 2.0 * g_var * xc) / n
    return dx, d_scale, d_bias


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class LeakyReLU(nnx.Module):
    """``torch.nn.LeakyReLU`` (slope 0 is ReLU); a parameter-free module so torch indices hold."""

    def __init__(self, negative_slope: float = 0.0):
        self.negative_slope = negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.negative_slope == 0.0:
            return jax.nn.relu(x)
        return jnp.where(x >= 0, x, x * self.negative_slope)


class Linear(nnx.Module):
    """``torch.nn.Linear`` with a ``[in, out]`` kernel, torch initialisation."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(_uniform(rngs.params(), (in_features, out_features), bound))
        self.bias = nnx.Param(_uniform(rngs.params(), (out_features,), bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]
