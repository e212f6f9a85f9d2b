"""2-D convolution with torch semantics (NHWC input, HWIO kernel, explicit padding).

``lax.conv_general_dilated`` everywhere except when the program is lowered for CPU, where XLA's
convolutions are slow for some of RetinaFace's shapes, so there (``lax.platform_dependent``: the
choice is made per platform at lowering, and is part of no global state) the same function is
written as
- a depthwise k x k convolution: k*k shifted multiply-adds (inputs of at most 8 channels at
  stride 1 on flattened rows, where XLA's loop over ``[B, H, W, 8]`` vectorises badly);
- a 1 x 1 convolution: a matmul (einsum);
- a dense convolution of a narrow input (the 3-channel stem): k*k*C broadcast multiply-adds;
and other dense convolutions stay XLA's. Every form is plain ``jnp``/``lax``, so differentiable
to any order; ``backends.xla_cpu.conv_ops`` gives them cheaper backward passes for training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MIN_TAP_CHANNELS = 16  # narrower inputs of a dense convolution (the RGB stem) use conv_narrow
MAX_FLAT_CHANNELS = 8  # stride-1 depthwise convolutions this narrow run on flattened rows


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int) -> jax.Array:
    """``y = conv(x, kernel)`` (cross-correlation, as torch), NHWC / HWIO."""
    return lax.platform_dependent(
        x,
        kernel,
        cpu=lambda x, k: cpu_conv2d(x, k, stride, padding, groups),
        default=lambda x, k: conv_xla(x, k, stride, padding, groups),
    )


def cpu_conv2d(
    x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int
) -> jax.Array:
    """:func:`conv2d` in the formulations that are fast on XLA's CPU backend (module docstring)."""
    cin = x.shape[-1]
    kh, kw, cin_g, cout = kernel.shape
    if groups == 1:
        if kh == kw == 1:
            return pointwise(strided(pad(x, padding), stride), kernel[0, 0])
        if cin >= MIN_TAP_CHANNELS:
            return conv_xla(x, kernel, stride, padding, 1)
        return conv_narrow(x, kernel, stride, padding)
    if groups == cin == cout and cin_g == 1:
        return conv_depthwise(x, kernel, stride, padding)
    return conv_xla(x, kernel, stride, padding, groups)


def conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int) -> jax.Array:
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def pad(x: jax.Array, p: int) -> jax.Array:
    """Zero padding of ``p`` on both spatial sides."""
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


def strided(x: jax.Array, stride: int) -> jax.Array:
    return x[:, ::stride, ::stride, :] if stride > 1 else x


def pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
    """1x1 convolution ``[B, H, W, C] x [C, O]`` as a matmul."""
    return jnp.einsum("bhwc,co->bhwo", x, w)


def taps(x: jax.Array, kh: int, kw: int, stride: int, padding: int):
    """Yield ``(i, j, view)``: the input window each kernel tap sees, at output resolution."""
    xp = pad(x, padding)
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


def tap_sum(views, kernel: jax.Array) -> jax.Array:
    """``sum(view * kernel[i, j, 0])`` over the taps ``(i, j, view)``: one fused loop."""
    out = None
    for i, j, view in views:
        term = view * kernel[i, j, 0]
        out = term if out is None else out + term
    return out


def depthwise_nhwc(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution as k*k shifted multiply-adds over NHWC."""
    kh, kw = kernel.shape[:2]
    return tap_sum(taps(x, kh, kw, stride, padding), kernel)


def _flat_rows(kernel_rows: jax.Array, n: int) -> jax.Array:
    """``[T, C] -> [T, n * C]``: each row repeated ``n`` times, as a product with a 0/1 matrix.

    A broadcast would be fused into its consumer and indexed modulo ``C`` there, which keeps
    LLVM from vectorising the loop; a dot is always materialised (and exact: one term is
    ``k * 1``, the others ``k * 0``). The matrix is built in ``jnp``, so ``n`` may be symbolic.
    """
    c = kernel_rows.shape[1]
    eye = np.eye(c, dtype=np.float32)[:, None, :]
    tile = jnp.broadcast_to(jnp.asarray(eye, kernel_rows.dtype), (c, n, c)).reshape(c, n * c)
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


def conv_depthwise(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise convolution; with few channels and stride 1 on flattened rows (bit-identical:
    the same products added in the same order)."""
    kh, kw, _, c = kernel.shape
    if stride != 1 or c > MAX_FLAT_CHANNELS:
        return depthwise_nhwc(x, kernel, stride, padding)
    xp = pad(x, padding)
    b, hp, wp, _ = xp.shape
    wo = wp - kw + 1
    rows = _flat_rows(kernel.reshape(kh * kw, c), wo).reshape(kh, kw, 1, wo * c)
    return tap_sum(_flat_taps(xp, kh, kw), rows).reshape(b, hp - kh + 1, wo, c)


def conv_narrow(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense convolution of a narrow input as k*k*C broadcast multiply-adds (one fused loop)."""
    kh, kw, cin, _ = kernel.shape
    out = None
    for i, j, view in taps(x, kh, kw, stride, padding):
        for c in range(cin):
            term = view[..., c : c + 1] * kernel[i, j, c]
            out = term if out is None else out + term
    return out
