"""Primitive layers with PyTorch semantics: ``Conv2d``, ``BatchNorm2d``, ``LeakyReLU``, ``Linear``.

NHWC activations, HWIO kernels, explicit integer padding. The convolution arithmetic lives in
``conv_ops`` so the formulation can be chosen per backend without touching parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from functools import partial, wraps

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.backends.native import native_training
from retinaface_jax.backends.native.native_training import Stats
from retinaface_jax.backends.native.ops import NO_ACTIVATION
from retinaface_jax.backends.xla_cpu.conv_ops import conv2d, conv2d_with_stats
from retinaface_jax.backends.xla_cpu.reductions import channel_sums

_ABSTRACT = contextvars.ContextVar("retinaface_jax_abstract_init", default=False)


@contextlib.contextmanager
def abstract_init() -> Iterator[None]:
    """Inside, layers create their variables as ``jax.ShapeDtypeStruct``: no RNG, no computation.

    This builds a model's structure cheaply for loading weights into it (every variable must
    then be assigned). ``nnx.eval_shape`` traces every initialiser instead, much of that time
    spent by NNX building error messages for the RNG counter's tracers, on every
    ``python detect.py`` start.
    """
    token = _ABSTRACT.set(True)
    try:
        yield
    finally:
        _ABSTRACT.reset(token)


def default_rngs(rngs: nnx.Rngs | None) -> nnx.Rngs | None:
    """``rngs``, else ``nnx.Rngs(0)`` (None under ``abstract_init``, where no key is drawn)."""
    if rngs is not None or _ABSTRACT.get():
        return rngs
    return nnx.Rngs(0)


def _torch_bound(kernel_shape: tuple[int, ...]) -> float:
    """torch's default init bound 1/sqrt(fan_in) for a layer's weight and bias (HWIO / [in, out])."""
    return 1.0 / math.sqrt(math.prod(kernel_shape[:-1]))


def _uniform(rngs: nnx.Rngs, shape: tuple[int, ...], bound: float) -> jax.Array:
    """U(-bound, bound) from ``rngs.params()`` (a shape only under ``abstract_init``)."""
    if _ABSTRACT.get():
        return jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


def _full(n: int, value: float) -> jax.Array:
    """A float32 vector of ``n`` times ``value`` (a shape only under ``abstract_init``)."""
    if _ABSTRACT.get():
        return jax.ShapeDtypeStruct((n,), jnp.float32)
    return jax.device_put(np.full((n,), value, np.float32))  # jnp.full compiles once per shape


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
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        bound = _torch_bound(shape)
        self.kernel = nnx.Param(_uniform(rngs, shape, bound))
        self.bias = nnx.Param(_uniform(rngs, (out_channels,), bound)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv2d(x, self.kernel[...], self.stride, self.padding, self.groups)
        if self.bias is not None:
            y = add_bias(y, self.bias[...])
        return y

    def with_stats(self, x: jax.Array) -> tuple[jax.Array, Stats | None]:
        """``(self(x), the output's batch statistics)``: given where a native train-step kernel
        computes them while writing the output (``conv_ops.conv2d_with_stats``; no bias), else
        None. The BatchNorm after this layer takes them (its ``stats``). Outside a native train
        step this is ``self(x)``, so subclasses that wrap ``__call__`` (the detector's padding
        masks) keep working."""
        if self.bias is not None or not native_training.active():
            return self(x), None
        return conv2d_with_stats(x, self.kernel[...], self.stride, self.padding, self.groups)


class BatchNorm2d(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis.

    Training mode normalises with the biased batch variance and updates the running variance with
    the unbiased one, as torch does. ``momentum`` is in the flax convention
    (``running = momentum * running + (1 - momentum) * batch``; torch's 0.1 is 0.9 here).
    Statistics are reduced over every axis but the last; under a ``('data',)`` mesh XLA makes that a
    global (all-device) reduction, so results do not depend on the device count.
    """

    INITIAL = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9):
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.scale = nnx.Param(_full(num_features, self.INITIAL["scale"]))
        self.bias = nnx.Param(_full(num_features, self.INITIAL["bias"]))
        self.mean = nnx.BatchStat(_full(num_features, self.INITIAL["mean"]))
        self.var = nnx.BatchStat(_full(num_features, self.INITIAL["var"]))
        self.use_running_average = False

    def __call__(
        self, x: jax.Array, activation: float | None = None, stats: Stats | None = None
    ) -> jax.Array:
        """Normalise ``x``; ``activation``: the negative slope of a LeakyReLU applied to the
        result (0: ReLU), fused with the normalisation (in training, its backward recomputes the
        activation's mask from ``x`` instead of storing another full-size tensor). ``stats``: in
        training, ``x``'s batch statistics if the layer that wrote ``x`` gave them
        (``Conv2d.with_stats``), else computed here."""
        slope = NO_ACTIVATION if activation is None else float(activation)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
            z = _affine(x, mean, jax.lax.rsqrt(var + self.eps), self.scale[...], self.bias[...])
            return leaky_relu(z, slope)
        y, mean, var = batch_norm_train(
            x, self.scale[...], self.bias[...], self.eps, slope, stats=stats
        )
        self._update_running(mean, var, math.prod(x.shape[:-1]))
        return y

    def into_conv(
        self, x: jax.Array, activation: float, conv: Conv2d, stats: Stats | None = None
    ) -> tuple[jax.Array, Stats | None]:
        """``conv.with_stats(self(x, activation, stats))``: the convolution's output and, where
        its kernel computes them, that output's batch statistics.

        In a CPU train step, when ``conv`` is a 3x3 depthwise layer (padding 1) or a 1x1
        stride-1 layer without bias that the native kernels run, the activation is never stored:
        the layer's kernels read ``x`` and normalise it row by row as they go, and the layer's
        input gradient comes with this layer's backward sums (:func:`batch_norm_conv_train`).
        Elsewhere it is the two layers one after the other.
        """
        kernel, stride, padding = conv.kernel[...], conv.stride, conv.padding
        if conv.groups > 1:
            consumer = "depthwise"
            fits = conv.groups == x.shape[-1] == conv.out_channels
            fits = fits and native_training.depthwise_applies(x, kernel, stride, padding)
        else:
            consumer = "pointwise"
            fits = native_training.pointwise_bn_applies(x, kernel, stride, padding)
        if self.use_running_average or conv.bias is not None or not fits:
            return conv.with_stats(self(x, activation, stats))
        scale, bias = self.scale[...], self.bias[...]
        y, mean, var, y_stats = batch_norm_conv_train(
            x, scale, bias, kernel, self.eps, activation, consumer, stride, stats=stats
        )
        self._update_running(mean, var, math.prod(x.shape[:-1]))
        return y, y_stats

    def of_conv(self, conv: Conv2d, x: jax.Array, activation: float | None = None) -> jax.Array:
        """``self(conv(x), activation)`` with the statistics ``conv``'s kernel gives
        (``Conv2d.with_stats``), for models that hold the two layers apart (ResNet)."""
        y, stats = conv.with_stats(x)
        return self(y, activation, stats)

    def _update_running(self, mean: jax.Array, var: jax.Array, n: int) -> None:
        """Running averages from a batch's mean and biased variance over ``n`` values (the
        variance made unbiased, as torch does)."""
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        self.var[...] = m * self.var[...] + (1 - m) * unbiased


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
    """``x > 0 ? x : slope * x``: identity for slope 1, ``relu`` for 0 (torch's subgradients:
    the slope at 0)."""
    if slope == NO_ACTIVATION:
        return x
    if slope == 0.0:
        return jax.nn.relu(x)
    return jnp.where(x > 0, x, x * slope)


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
    return dx, *_no_stats_cotangent(mean), d_scale, d_bias


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


class LeakyReLU(nnx.Module):
    """``torch.nn.LeakyReLU`` (slope 0 is ReLU); a parameter-free module so torch indices hold."""

    def __init__(self, negative_slope: float = 0.0):
        self.negative_slope = negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return leaky_relu(x, self.negative_slope)


class Linear(nnx.Module):
    """``torch.nn.Linear`` with a ``[in, out]`` kernel, torch initialisation."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        bound = _torch_bound((in_features, out_features))
        self.kernel = nnx.Param(_uniform(rngs, (in_features, out_features), bound))
        self.bias = nnx.Param(_uniform(rngs, (out_features,), bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


@partial(jax.jit, static_argnums=1)
def _draw_symmetric(key: jax.Array, n: int) -> jax.Array:
    """``n`` draws of U(-1, 1) as ``2 * U(0, 1) - 1`` (exact in float32, so scaling it by a bound
    rounds once, the same on the host and in XLA)."""
    return 2.0 * jax.random.uniform(key, (n,), jnp.float32) - 1.0


def initialize(module: nnx.Module, rngs: nnx.Rngs) -> None:
    """Give every variable of ``module`` (built under ``abstract_init``) its initial value.

    Conv2d/Linear weights and biases get torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), all taken from
    one random vector: one compiled program per model, where drawing per parameter compiles one
    per parameter shape, which made building a model slow. BatchNorm gets ``BatchNorm2d.INITIAL``. Eagerly the vector is split on the
    host; under a trace (``nnx.jit``, ``nnx.eval_shape``) with ``jnp``: the same numbers either
    way. Does nothing inside an outer ``abstract_init`` (the outer module initialises).
    """
    if _ABSTRACT.get():
        return
    uniform: list[tuple[nnx.Variable, float]] = []
    for _, m in nnx.iter_modules(module):
        if isinstance(m, BatchNorm2d):
            for name, value in BatchNorm2d.INITIAL.items():
                getattr(m, name).set_value(_full(m.num_features, value))
        elif isinstance(m, (Conv2d, Linear)):
            bound = _torch_bound(m.kernel.shape)
            uniform += [(v, bound) for v in (m.kernel, m.bias) if v is not None]
    if not uniform:
        return
    sizes = [math.prod(v.shape) for v, _ in uniform]
    values = _draw_symmetric(rngs.params(), sum(sizes))
    host = None if isinstance(values, jax.core.Tracer) else np.asarray(values)
    offset = 0
    for (var, bound), n in zip(uniform, sizes):
        scale = np.float32(bound)
        if host is None:
            var.set_value(values[offset : offset + n].reshape(var.shape) * scale)
        else:
            var.set_value(jax.device_put(host[offset : offset + n].reshape(var.shape) * scale))
        offset += n


def initialized_at_once(init: Callable[..., None]) -> Callable[..., None]:
    """Decorator for a composite module's ``__init__(..., rngs=...)``: build the layers as shapes
    (``abstract_init``), then draw every parameter at once (``initialize``). Nested composites
    leave it to the outermost one."""

    @wraps(init)
    def wrapper(self, *args, rngs: nnx.Rngs | None = None, **kwargs) -> None:
        rngs = default_rngs(rngs)
        with abstract_init():
            init(self, *args, rngs=rngs, **kwargs)
        initialize(self, rngs)

    return wrapper
