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

The padded region is an explicit value, :class:`PaddedRegion`, handed to whatever runs the
network: no module state, so concurrent traces in several threads cannot see each other's region.
Usage (inside a traced function, on a throwaway merged copy of the model)::

    region = PaddedRegion(valid_hw, images.shape[1:3])
    outputs = masked_for_padding(nnx.merge(graphdef, state), region)(images)
"""

from __future__ import annotations

import jax
from flax import nnx

from retinaface_jax.backends.padded_region import PaddedRegion, mask_padded
from retinaface_jax.models.layers import BatchNorm2d, Conv2d

__all__ = ["PaddedRegion", "mask_padded", "masked_for_padding"]


_REGION_ATTR = "_padded_region"  # set on the throwaway copy's masking modules only


class _MaskedInputConv2d(Conv2d):
    def __call__(self, x: jax.Array) -> jax.Array:
        return super().__call__(mask_padded(x, getattr(self, _REGION_ATTR)))


class _MaskedOutputBatchNorm2d(BatchNorm2d):
    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        return mask_padded(super().__call__(x, *args, **kwargs), getattr(self, _REGION_ATTR))


def _mask_with(module: nnx.Module, cls: type, region: PaddedRegion) -> None:
    module.__class__ = cls
    object.__setattr__(module, _REGION_ATTR, region)  # plain Python data, not model state


def masked_for_padding(model: nnx.Module, region: PaddedRegion) -> nnx.Module:
    """Make ``model`` (in place) zero the padded ``region`` before every padded convolution (and
    after ResNet50's stem BatchNorm); returns it.

    Meant for a throwaway copy (e.g. the result of ``nnx.merge`` inside a jitted function): the
    classes of padded ``Conv2d`` modules (and ResNet50's stem BatchNorm) are swapped for masking
    subclasses that hold ``region``; parameters are unchanged.
    """
    for _, module in nnx.iter_modules(model):
        if type(module) is Conv2d and module.padding > 0:
            _mask_with(module, _MaskedInputConv2d, region)
    body = getattr(model, "body", None)
    stem_bn = getattr(body, "bn1", None)
    if type(stem_bn) is BatchNorm2d:
        _mask_with(stem_bn, _MaskedOutputBatchNorm2d, region)
    return model
