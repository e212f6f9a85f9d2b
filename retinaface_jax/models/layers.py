"""Primitive layers with PyTorch semantics: ``Conv2d``, ``BatchNorm2d``, ``LeakyReLU``, ``Linear``.

NHWC activations, HWIO kernels, explicit integer padding, torch's initialisers and BatchNorm
arithmetic. Plain JAX throughout (the convolution is ``models.conv.conv2d``), so every layer is
differentiable to any order in forward and reverse mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial, wraps

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retinaface_jax.models.conv import conv2d


class _ShapesOnly:
    """The type of :data:`SHAPES_ONLY`."""

    def __repr__(self) -> str:
        return "SHAPES_ONLY"


SHAPES_ONLY = _ShapesOnly()
"""Pass as ``rngs`` to build a layer's weights as ``jax.ShapeDtypeStruct``: no random numbers,
no computation. For a structure that weights are then loaded into (``abstract_model``)."""

Rngs = nnx.Rngs | _ShapesOnly


def _torch_bound(kernel_shape: tuple[int, ...]) -> float:
    """torch's default init bound 1/sqrt(fan_in) for a layer's weight and bias (HWIO / [in, out])."""
    return 1.0 / math.sqrt(math.prod(kernel_shape[:-1]))


def _uniform(rngs: Rngs, shape: tuple[int, ...], bound: float) -> jax.Array:
    """U(-bound, bound) from ``rngs.params()`` (a shape only for ``SHAPES_ONLY``)."""
    if rngs is SHAPES_ONLY:
        return jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)


def _full(n: int, value: float) -> jax.Array:
    """A float32 vector of ``n`` times ``value`` (``jnp.full`` would compile once per shape)."""
    return jax.device_put(np.full((n,), value, np.float32))


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
        rngs: Rngs,
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
        return y if self.bias is None else y + self.bias[...]


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

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x, axes)
            var = jnp.mean(jnp.square(x - mean), axes)
            self.update_running(mean, var, x.size // x.shape[-1])
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]

    def update_running(self, mean: jax.Array, var: jax.Array, n: int) -> None:
        """Move the running averages toward a batch's mean and biased variance over ``n`` values
        (the variance made unbiased, as torch does); not differentiated."""
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
        unbiased = jax.lax.stop_gradient(var) * (n / max(n - 1, 1))
        self.var[...] = m * self.var[...] + (1 - m) * unbiased


def leaky_relu(x: jax.Array, slope: float) -> jax.Array:
    """``x > 0 ? x : slope * x`` (torch's gradient at 0: the slope; ``relu`` for slope 0)."""
    if slope == 0.0:
        return jax.nn.relu(x)
    return jnp.where(x > 0, x, x * slope)


class LeakyReLU(nnx.Module):
    """``torch.nn.LeakyReLU`` (slope 0 is ReLU); a parameter-free module so torch indices hold."""

    def __init__(self, negative_slope: float = 0.0):
        self.negative_slope = negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return leaky_relu(x, self.negative_slope)


class Linear(nnx.Module):
    """``torch.nn.Linear`` with a ``[in, out]`` kernel, torch initialisation."""

    def __init__(self, in_features: int, out_features: int, *, rngs: Rngs):
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
    """Give every variable of ``module`` its initial value.

    Conv2d/Linear weights and biases get torch's U(-1/sqrt(fan_in), 1/sqrt(fan_in)), all taken from
    one random vector: one compiled program per model, where drawing per parameter compiles one
    per parameter shape, which made building a model slow. BatchNorm gets ``BatchNorm2d.INITIAL``.
    Eagerly the vector is split on the host; under a trace (``nnx.jit``, ``nnx.eval_shape``) with
    ``jnp``: the same numbers either way.
    """
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
    (``SHAPES_ONLY``), then draw every parameter at once (:func:`initialize`). ``rngs`` None
    means ``nnx.Rngs(0)``; ``SHAPES_ONLY`` (what an enclosing composite passes) leaves the
    shapes for it to fill."""

    @wraps(init)
    def wrapper(self, *args, rngs: Rngs | None = None, **kwargs) -> None:
        init(self, *args, rngs=SHAPES_ONLY, **kwargs)
        if rngs is not SHAPES_ONLY:
            initialize(self, nnx.Rngs(0) if rngs is None else rngs)

    return wrapper
