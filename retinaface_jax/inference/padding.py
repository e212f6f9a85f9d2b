"""Exact padded inference: zero the padded region wherever the original would read zero padding.

The original runs the network at the exact image size, so every padded convolution reads zeros
just beyond the image border. When we pad an input into a larger bucket, the padded region holds
non-zero activations after the first layer and leaks into border cells. Zeroing, at each
convolution with ``padding > 0``, the input positions beyond the valid extent ``ceil(h / f)`` of
that feature map (``f`` = its stride relative to the input) restores exactly what the original
sees. With bucket sides that are multiples of 32, every feature map is exactly ``1/f`` of the
bucket, the FPN's nearest upsampling maps ``i -> floor(i / 2)`` as it does for the original odd
sizes, and the valid outputs are bit-identical to an unpadded run (tests check this). For ResNet50
the stem BatchNorm's output is masked too, so the 3x3 max-pool never sees padded activations.

Usage (inside a traced function, on a throwaway merged copy of the model)::

    model = masked_for_padding(nnx.merge(graphdef, state))
    with valid_region(valid_hw, images.shape[1:3]):
        outputs = model(images)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from retinaface_jax.models.layers import BatchNorm2d, Conv2d

_REGION: tuple[jax.Array, tuple[int, int]] | None = None


@contextlib.contextmanager
def valid_region(valid_hw: jax.Array, padded_hw: tuple[int, int]) -> Iterator[None]:
    """While tracing: images of the batch are valid in their top-left ``valid_hw [B, 2]`` pixels."""
    global _REGION
    previous = _REGION
    _REGION = (valid_hw, (int(padded_hw[0]), int(padded_hw[1])))
    try:
        yield
    finally:
        _REGION = previous


def region_active() -> bool:
    """Whether a :func:`valid_region` is in effect (padded inputs are being masked)."""
    return _REGION is not None


def mask_padded(x: jax.Array) -> jax.Array:
    """Zero ``x [B, h, w, C]`` outside each image's valid extent (identity outside a region)."""
    if _REGION is None:
        return x
    valid_hw, (hb, wb) = _REGION
    fh, fw = hb // x.shape[1], wb // x.shape[2]
    if fh * x.shape[1] != hb or fw * x.shape[2] != wb:
        raise ValueError(f"feature map {x.shape[1:3]} does not divide the padded input {hb}x{wb}")
    vh = -(-valid_hw[:, 0] // fh)
    vw = -(-valid_hw[:, 1] // fw)
    rows = jnp.arange(x.shape[1])[None, :, None] < vh[:, None, None]
    cols = jnp.arange(x.shape[2])[None, None, :] < vw[:, None, None]
    return jnp.where((rows & cols)[..., None], x, jnp.zeros((), x.dtype))


class _MaskedInputConv2d(Conv2d):
    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(mask_padded(x))


class _MaskedOutputBatchNorm2d(BatchNorm2d):
    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        return mask_padded(super().__call__(x, *args, **kwargs))


def masked_for_padding(model: nnx.Module) -> nnx.Module:
    """Make ``model`` (in place) mask padded regions inside :func:`valid_region`; returns it.

    Meant for a throwaway copy (e.g. the result of ``nnx.merge`` inside a jitted function): the
    classes of padded ``Conv2d`` modules (and ResNet50's stem BatchNorm) are swapped for masking
    subclasses; parameters and results outside a ``valid_region`` are unchanged.
    """
    for _, module in nnx.iter_modules(model):
        if type(module) is Conv2d and module.padding > 0:
            module.__class__ = _MaskedInputConv2d
    body = getattr(model, "body", None)
    stem_bn = getattr(body, "bn1", None)
    if type(stem_bn) is BatchNorm2d:
        stem_bn.__class__ = _MaskedOutputBatchNorm2d
    return model
