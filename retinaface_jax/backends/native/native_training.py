"""Native CPU kernels inside the train step: convolutions and their gradients, BatchNorm's sums.

XLA's CPU loops for MobileNet's depthwise layers and for per-channel reductions are memory-bound
and slow at training resolution, its filter-gradient convolutions and the transposes it
materialises for 1x1 weight gradients are slow too. So on CPU the train step runs
- the 3x3 depthwise convolutions and both gradients: ``ops.depthwise`` / ``ops.depthwise_grad``;
- every dense convolution with a multiple of 8 outputs: ``ops.conv`` (Winograd F(4x4, 3x3) for
  the 3x3 stride-1 ones; weights transformed and packed by XLA each step); the input gradients of
  3x3 stride-1 pad-1 and 1x1 stride-1 layers, which are layers of the same kind, also by
  ``ops.conv`` (XLA's dot for the 1x1 ones ran far below a core's peak); other input gradients
  by XLA; every kernel gradient by ``ops.weight_grad`` (Winograd F(3x3, 4x4) for 3x3 stride-1);
- BatchNorm's batch statistics: by the kernel that writes the BatchNorm's input, each row's
  while it is in cache, merged per image (``moments=True``: :func:`dense`, :func:`depthwise`,
  :func:`batch_norm_into`), and combined over the batch by XLA (:func:`stats_from_images`);
  ``ops.moments`` for an input no kernel wrote;
- BatchNorm's backward sums: ``ops.bn_grad_sums``;
- MultiBoxLoss's matching overlaps (each face's best prior, each prior's best face):
  :func:`match_overlaps`, one pass instead of XLA's loop over chunks of faces (``loss.match``);
- a BatchNorm + LeakyReLU whose next layer is a 3x3 depthwise or a 1x1 stride-1 layer: read
  through by that layer (:func:`batch_norm_into`, ``train_layers.batch_norm_into_conv``). Its
  forward and kernel-gradient kernels normalise the BatchNorm's input row by row, so the
  activation is never stored, and its input-gradient kernel computes the BatchNorm's backward
  sums over each row it writes (:func:`batch_norm_into_grad`) and writes the BatchNorm's direct
  input gradient; the part through the batch statistics goes back, as the cotangents of the
  per-image moments, to the kernel that wrote the BatchNorm's input, whose gradient kernel adds
  it to its output's cotangent row by row as it reads it (:func:`stats_cotangent`; the stem's
  kernel-gradient kernel too, and XLA for the other kernels);
while the other elementwise parts (normalisation, activations, standalone BatchNorms' input
gradients) stay on XLA. The choice is made while the step is traced, inside
:func:`native_gradients` (which the train step enters when it runs on CPU and the kernels are
available; ``train.step.make_train_step`` with ``kernels='native'``/``'auto'`` on CPU, around its
whole value-and-grad, since the kernels' backward rules are traced there too); inference never
enters it, and GPU/TPU steps never do, so they keep XLA's own convolutions. float64 always takes XLA's path.

Autodiff contract: values and first-order gradients equal XLA's (``tests/test_native_training.py``);
reverse mode only, once (the kernels have no JVP rules, so forward mode and higher orders raise).

Under a data-sharded mesh the kernels run per device on its share of the batch (``shard_map``):
their sums (kernel gradients, batch statistics) come out per image and are combined over the
batch by XLA, which turns that into a cross-device reduction, as for every other parameter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from retinaface_jax.backends.native import ops

Stats = tuple[jax.Array, jax.Array]  # a BatchNorm input's batch mean and biased variance [C]

# While a train step is traced: the mesh it is sharded over (None: one device); unset otherwise.
_ACTIVE: ContextVar[tuple[Mesh | None] | None] = ContextVar("native_gradients", default=None)


@contextlib.contextmanager
def native_gradients(mesh: Mesh | None = None) -> Iterator[None]:
    """Within this block (while tracing), convolutions, their gradients and BatchNorm's sums run
    on the native kernels where they apply (the ``*_applies`` functions).

    ``mesh``: the ``('data',)`` mesh the batch is sharded over, if any. The caller checks that the
    kernels are registered (``native.native_kernels_available()``) and that the step runs on CPU.
    """
    token = _ACTIVE.set((mesh,))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """Whether a train step is being traced inside :func:`native_gradients`."""
    return _ACTIVE.get() is not None


def depthwise_applies(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> bool:
    """Whether this depthwise convolution runs natively here: inside :func:`native_gradients`,
    float32, a 3x3 kernel with padding 1, stride 1 or 2 and a multiple of 8 channels."""
    return (
        _ACTIVE.get() is not None
        and x.dtype == kernel.dtype == jnp.float32
        and kernel.shape[:2] == (3, 3)
        and padding == 1
        and stride in (1, 2)
        and x.shape[-1] % 8 == 0
    )


def depthwise(
    x: jax.Array, kernel: jax.Array, stride: int, *, moments: bool = False
) -> jax.Array | tuple[jax.Array, Stats]:
    """``ops.depthwise`` with native gradients, batch-parallel over the active mesh; with
    ``moments``, ``(y, batch statistics of y)`` (:func:`_stats_result`)."""
    return _stats_result(_depthwise(x, kernel, stride, _mesh(), moments), moments)


def _mesh() -> Mesh | None:
    active = _ACTIVE.get()
    return None if active is None else active[0]


def _per_device(fn, mesh: Mesh | None, batched: tuple[bool, ...], outputs: int = 1):
    """``fn`` run per device on its rows of the batch: the operands flagged in ``batched`` split
    along their leading axis, the others whole; every output split. As is without a mesh."""
    if mesh is None or mesh.devices.size == 1:
        return fn
    batch, whole = P(mesh.axis_names[0]), P()
    in_specs = tuple(batch if b else whole for b in batched)
    out_specs = batch if outputs == 1 else (batch,) * outputs
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def stats_from_images(mean_n: jax.Array, m2_n: jax.Array, per_image: int) -> Stats:
    """Batch mean and biased variance per channel from per-image means and M2 ``[N, C]`` (over
    ``per_image`` values each, ``ops.moments``): the images' means averaged, and their M2 plus
    the spread of their means (Chan et al.'s combination, free of the cancellation of a sum of
    squares). Under a data mesh XLA makes the sums over images cross-device reductions."""
    mean = jnp.mean(mean_n, axis=0)
    m2 = jnp.sum(m2_n, axis=0) + per_image * jnp.sum(jnp.square(mean_n - mean), axis=0)
    return mean, m2 / (mean_n.shape[0] * per_image)


def _stats_result(results, moments: bool):
    """A kernel call's results: ``y``, or with ``moments`` ``(y, per-image moments [N, 2, C])``
    made ``(y, (mean, var))`` (:func:`stats_from_images`). The statistics carry their gradient:
    a BatchNorm read through by the next layer (``train_layers.batch_norm_conv_train``) hands back the
    cotangents of its mean and variance, and the kernel that wrote ``y`` adds their part to
    ``y``'s cotangent (:func:`stats_cotangent`); a standalone BatchNorm stops it and
    differentiates through ``y`` instead (``train_layers.batch_norm_train``)."""
    if not moments:
        return results
    y, m = results
    return y, stats_from_images(m[:, 0], m[:, 1], y.shape[1] * y.shape[2])


def stats_cotangent(y: jax.Array, m: jax.Array, dm) -> ops.StatsCotangent | None:
    """The part of ``y``'s cotangent through its per-image moments ``m [N, 2, C]`` (mean, M2 over
    the ``P`` pixels of each image) for their cotangent ``dm``: ``dmean / P + 2 dM2 (y - mean)``
    per image, as ``ops.StatsCotangent`` (None when ``dm`` is a symbolic zero: nothing to add)."""
    if isinstance(dm, SymbolicZero):
        return None
    per_image = y.shape[1] * y.shape[2]
    return ops.StatsCotangent(y, jnp.stack([m[:, 0], dm[:, 0] / per_image, 2.0 * dm[:, 1]], 1))


def with_stats_cotangent(dy: jax.Array, stats: ops.StatsCotangent | None) -> jax.Array:
    """``dy`` plus that part, by XLA (for the kernels that do not add it as they read ``dy``)."""
    if stats is None:
        return dy
    m, a, b = (stats.coef[:, None, None, i] for i in range(3))
    return dy + (a + b * (stats.y - m))


def instantiate_cotangent(dy) -> jax.Array:
    """``dy``, or zeros of its shape for a symbolic-zero cotangent (custom VJPs defined with
    ``symbolic_zeros=True``)."""
    return jnp.zeros(dy.aval.shape, dy.aval.dtype) if isinstance(dy, SymbolicZero) else dy


def _output_cotangent(residuals, cotangents, moments: bool) -> jax.Array:
    """The cotangent of a kernel's output ``y`` with the part through its moments (if any) added by
    XLA; ``residuals`` end with ``(y, m)`` when ``moments``."""
    if not moments:
        return instantiate_cotangent(cotangents)
    y, m = residuals[-2:]
    dy, dm = cotangents
    return with_stats_cotangent(instantiate_cotangent(dy), stats_cotangent(y, m, dm))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, kernel, stride, mesh, moments):
    call = _per_device(
        lambda x, k: ops.depthwise(x, k, stride, moments=moments), mesh, (True, False), 1 + moments
    )
    return call(x, kernel)


def _depthwise_fwd(x, kernel, stride, mesh, moments):
    x, kernel = x.value, kernel.value
    out = _depthwise(x, kernel, stride, mesh, moments)
    return out, (x, kernel, *(out if moments else ()))


def _depthwise_bwd(stride, mesh, moments, residuals, cotangents):
    x, kernel = residuals[:2]
    dy = _output_cotangent(residuals, cotangents, moments)
    call = _per_device(
        lambda x, k, g: ops.depthwise_grad(x, k, g, stride), mesh, (True, False, True), outputs=2
    )
    dx, dk = call(x, kernel, dy)
    return dx, dk.sum(0)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd, symbolic_zeros=True)


def pointwise_bn_applies(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> bool:
    """Whether a 1x1 layer reading a BatchNorm -> LeakyReLU runs natively here, the activation
    never stored (:func:`batch_norm_into`): inside :func:`native_gradients`, float32, stride 1, no
    padding, multiples of 8 channels in and out."""
    return (
        _ACTIVE.get() is not None
        and x.dtype == kernel.dtype == jnp.float32
        and kernel.shape[:2] == (1, 1)
        and (stride, padding) == (1, 0)
        and x.shape[-1] % 8 == 0
        and kernel.shape[-1] % 8 == 0
        and x.shape[-1] <= ops.MAX_CIN
        and kernel.shape[-1] <= ops.MAX_CIN
    )


def batch_norm_into(
    consumer: str,
    x: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    slope: float,
    stride: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """The ``consumer`` layer (``'depthwise'``: 3x3, padding 1; ``'pointwise'``: 1x1, stride 1)
    on ``leaky_relu(x * scale + shift, slope)``, computed row by row inside its kernel
    (``ops.depthwise_bn`` / ``ops.conv_bn``) and never stored; per device: ``(y, y's per-image
    moments [N, 2, C])``. Differentiated only through :func:`batch_norm_into_grad`."""
    mesh, batched = _mesh(), (True, False, False, False)
    if consumer == "depthwise":
        call = _per_device(
            lambda *a: ops.depthwise_bn(*a, slope, stride, moments=True), mesh, batched, 2
        )
        return call(x, kernel, scale, shift)
    params, layer = ops.plain_layer(kernel, stride=1, padding=0)
    call = _per_device(
        lambda x, p, k, c: ops.conv_bn(x, p, layer, k, c, slope, moments=True), mesh, batched, 2
    )
    return call(x, params, scale, shift)


def batch_norm_into_grad(
    consumer: str,
    x: jax.Array,
    kernel: jax.Array,
    dy: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    mean: jax.Array,
    slope: float,
    stride: int = 1,
    stats: ops.StatsCotangent | None = None,
) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
    """Gradients of :func:`batch_norm_into` for the cotangent ``dy`` (plus ``stats``, the part
    through ``y``'s moments, added by the kernel as it reads ``dy``), per device: ``(dx,
    dkernel, (sum(g), sum(g * (x - mean))))``: ``dx = scale * g`` the BatchNorm's direct input
    gradient (``g`` the cotangent before the activation), the kernel gradient and the
    BatchNorm's backward sums combined over the batch."""
    mesh = _mesh()
    batched = (True, False, True, False, False, False, True)  # stats: None or per image
    if consumer == "depthwise":
        call = _per_device(
            lambda *a: ops.depthwise_bn_grad(*a[:6], slope, stride, a[6]), mesh, batched, 3
        )
        dx, dk, sums = call(x, kernel, dy, scale, shift, mean, stats)
        dk = jnp.sum(dk, axis=(0, 1))
    else:
        params, layer = ops.plain_layer(jnp.transpose(kernel, (0, 1, 3, 2)), stride=1, padding=0)
        call = _per_device(
            lambda g, p, *a: ops.conv_bn_grad(g, p, layer, *a[:4], slope, a[4]), mesh, batched, 3
        )
        dx, dk, sums = call(dy, params, x, scale, shift, mean, stats)
        dk = jnp.sum(dk, axis=(0, 1)).reshape(kernel.shape)
    return dx, dk, (jnp.sum(sums[:, :, 0], axis=(0, 1)), jnp.sum(sums[:, :, 1], axis=(0, 1)))


def batch_norm_applies(x: jax.Array) -> bool:
    """Whether BatchNorm's sums over ``x`` run natively here: inside :func:`native_gradients`, a
    float32 NHWC ``x`` with a multiple of 8 channels."""
    return (
        _ACTIVE.get() is not None
        and x.dtype == jnp.float32
        and x.ndim == 4
        and x.shape[-1] % 8 == 0
        and x.shape[1] * x.shape[2] > 0
    )


def batch_moments(x: jax.Array) -> Stats:
    """Batch mean and biased variance per channel of NHWC ``x``: per image (mean, M2) from
    ``ops.moments``, combined over the batch (:func:`stats_from_images`); differentiable (the
    part of ``x``'s cotangent through them added by XLA: :func:`with_stats_cotangent`)."""
    m = _image_moments(x, _mesh())
    return stats_from_images(m[:, 0], m[:, 1], x.shape[1] * x.shape[2])


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _image_moments(x, mesh):
    mean_n, m2_n = _per_device(ops.moments, mesh, (True,), outputs=2)(x)
    return jnp.stack([mean_n, m2_n], axis=1)


def _image_moments_fwd(x, mesh):
    m = _image_moments(x, mesh)
    return m, (x, m)


def _image_moments_bwd(mesh, residuals, dm):
    x, m = residuals
    return (with_stats_cotangent(jnp.zeros_like(x), stats_cotangent(x, m, dm)),)


_image_moments.defvjp(_image_moments_fwd, _image_moments_bwd)


def match_overlaps(
    truths: jax.Array, usable: jax.Array, priors: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``ops.match_overlaps`` (MultiBoxLoss's matching overlaps, ``loss._best_overlaps``),
    batch-parallel over the active mesh. Its inputs are data: it has no gradient."""
    call = _per_device(ops.match_overlaps, _mesh(), (True, True, False), outputs=4)
    return call(*(jax.lax.stop_gradient(a) for a in (truths, usable, priors)))


def batch_norm_grad_sums(
    dy: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    slope: float = ops.NO_ACTIVATION,
) -> tuple[jax.Array, jax.Array]:
    """``(sum(g), sum(g * (x - mean)))`` per channel over the batch and space, ``g`` the
    cotangent ``dy`` through ``leaky_relu(x * scale + shift, slope)`` (``ops.bn_grad_sums``)."""
    call = _per_device(
        lambda dy, x, m, k, c: ops.bn_grad_sums(dy, x, m, k, c, slope),
        _mesh(),
        (True, True, False, False, False),
        outputs=2,
    )
    sum_g, sum_gx = call(dy, x, mean, scale, shift)
    return jnp.sum(sum_g, axis=0), jnp.sum(sum_gx, axis=0)


def dense_applies(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> bool:
    """Whether this dense (ungrouped) convolution runs natively here: inside
    :func:`native_gradients`, float32, a square kernel, a multiple of 8 output channels."""
    kh, kw, cin, cout = kernel.shape
    return (
        _ACTIVE.get() is not None
        and x.dtype == kernel.dtype == jnp.float32
        and kh == kw
        and cout % 8 == 0
        and cin <= ops.MAX_CIN
    )


def dense_image_applies(pixels: jax.Array, kernel: jax.Array) -> bool:
    """Whether this layer reads the uint8 image itself (:func:`dense` with ``mean``): inside
    :func:`native_gradients`, the RGB stem (3x3 over 3 channels, a multiple of 8 outputs)."""
    kh, kw, cin, cout = kernel.shape
    return (
        _ACTIVE.get() is not None
        and pixels.dtype == jnp.uint8
        and kernel.dtype == jnp.float32
        and (kh, kw, cin, pixels.shape[-1]) == (3, 3, 3, 3)
        and cout % 8 == 0
    )


def dense(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    padding: int,
    *,
    moments: bool = False,
    mean: tuple[float, ...] | None = None,
) -> jax.Array | tuple[jax.Array, Stats]:
    """A dense convolution on the native kernels (Winograd F(4x4, 3x3) when it applies, else
    direct), its kernel gradient natively, its input gradient natively for 3x3 stride-1 pad-1
    (FPN merges, SSH; Winograd) and 1x1 stride-1 layers with a multiple of 8 inputs, else by
    XLA. With ``moments``, ``(y, batch statistics of y)`` (:func:`_stats_result`). With
    ``mean``, ``x`` is the uint8 image (:func:`dense_image_applies`), read as
    ``float32(x) - mean`` by the forward and kernel-gradient kernels: no float32 copy of it."""
    return _stats_result(_dense(x, kernel, stride, padding, _mesh(), moments, mean), moments)


def weight_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_size: int,
    stride: int,
    padding: int,
    stats: ops.StatsCotangent | None = None,
    mean: tuple[float, ...] | None = None,
) -> jax.Array:
    """The kernel gradient ``[k, k, cin, cout]`` of a dense convolution, per device and image by
    ``ops.weight_grad`` (``stats``: the part of ``dy`` through its moments, and ``mean``: that
    of the uint8 image ``x``, for the stem), summed over the batch."""
    call = _per_device(
        lambda x, g, st: ops.weight_grad(x, g, kernel_size, stride, padding, st, mean),
        _mesh(),
        (True, True, True),
    )
    return jnp.sum(call(x, dy, stats), axis=0)


def _conv(
    x: jax.Array,
    kernel: jax.Array,
    stride: int,
    padding: int,
    mesh: Mesh | None,
    moments: bool = False,
    mean: tuple[float, ...] | None = None,
):
    """``conv(x, kernel)`` (no bias, no activation) by ``ops.conv``, per device; with
    ``moments``, also its per-image moments; with ``mean``, of the uint8 ``x`` minus it."""
    params, layer = ops.plain_layer(kernel, stride=stride, padding=padding)
    offset = None
    if mean is not None:  # the mean after the layer's parameters, where ops.conv reads it
        offset = params.shape[0]
        params = jnp.concatenate([params, jnp.asarray(mean, jnp.float32)])
    call = _per_device(
        lambda x, p: ops.conv(x, p, layer, offset, moments=moments),
        mesh,
        (True, False),
        1 + moments,
    )
    return call(x, params)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _dense(x, kernel, stride, padding, mesh, moments, mean):
    return _conv(x, kernel, stride, padding, mesh, moments, mean)


def _dense_fwd(x, kernel, stride, padding, mesh, moments, mean):
    x, kernel = x.value, kernel.value
    out = _dense(x, kernel, stride, padding, mesh, moments, mean)
    return out, (x, kernel, *(out if moments else ()))


def _dense_bwd(stride, padding, mesh, moments, mean, residuals, cotangents):
    """dx of a 3x3 stride-1 pad-1 or 1x1 stride-1 layer: the convolution of ``dy`` with the
    flipped, transposed kernel (pad k - 1 - p = p) on the same kernel; other layers' dx by XLA
    (the stem's is unused, so XLA drops it; the uint8 image has none). ``dy`` with the part
    through the moments added: by the stem's kernel-gradient kernel as it reads ``dy``, by XLA
    for the other layers."""
    x, kernel = residuals[:2]
    k, _, cin, _ = kernel.shape
    if (k, cin) == (3, 3):  # the stem
        direct, stats = cotangents, None
        if moments:
            y, m = residuals[-2:]
            direct, stats = cotangents[0], stats_cotangent(y, m, cotangents[1])
        direct = instantiate_cotangent(direct)
        dw = weight_grad(x, direct, k, stride, padding, stats, mean)
        if mean is not None:
            return None, dw
        dy = with_stats_cotangent(direct, stats)  # for XLA's dx only (dropped when unused)
    else:
        dy = _output_cotangent(residuals, cotangents, moments)
        dw = weight_grad(x, dy, k, stride, padding)
    if (k, stride, padding) in ((3, 1, 1), (1, 1, 0)) and cin % 8 == 0:
        dx = _conv(dy, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)), 1, padding, mesh)
    else:
        _, x_vjp = jax.vjp(
            lambda x: jax.lax.conv_general_dilated(
                x,
                kernel,
                (stride, stride),
                ((padding, padding), (padding, padding)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ),
            x,
        )
        (dx,) = x_vjp(dy)
    return dx, dw


_dense.defvjp(_dense_fwd, _dense_bwd, symbolic_zeros=True)
