"""Exact padded inference: the valid region of a padded batch and the mask that zeroes the rest.

The original runs the network at the exact image size, so every padded convolution reads zeros
just beyond the image border. When we pad an input into a larger bucket, the padded region holds
non-zero activations after the first layer and leaks into border cells. Zeroing, at each
convolution with ``padding > 0``, the input positions beyond the valid extent ``ceil(h / f)`` of
that feature map (``f`` = its stride relative to the input) restores exactly what the original
sees. With bucket sides that are multiples of 32, every feature map is exactly ``1/f`` of the
bucket, the FPN's nearest upsampling maps ``i -> floor(i / 2)`` as it does for the original odd
sizes, and the valid outputs are bit-identical to an unpadded run (tests check this). For ResNet50
the stem's output is masked too, so the 3x3 max-pool never sees padded activations.

The region is an explicit value handed to whatever runs the network
(``backends.planned_forward``, ``backends.native.kernel_forward``): no module state, so
concurrent traces in several threads cannot see each other's region.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PaddedRegion(NamedTuple):
    """Images of a padded batch ``[B, *padded_hw, C]`` are valid in their top-left
    ``valid_hw [B, 2]`` pixels."""

    valid_hw: jax.Array
    padded_hw: tuple[int, int]


def mask_padded(x: jax.Array, region: PaddedRegion | None) -> jax.Array:
    """Zero ``x [B, h, w, C]`` outside each image's valid extent (identity when ``region`` is
    None)."""
    if region is None:
        return x
    valid_hw, (hb, wb) = region.valid_hw, (int(region.padded_hw[0]), int(region.padded_hw[1]))
    fh, fw = hb // x.shape[1], wb // x.shape[2]
    if fh * x.shape[1] != hb or fw * x.shape[2] != wb:
        raise ValueError(f"feature map {x.shape[1:3]} does not divide the padded input {hb}x{wb}")
    vh = -(-valid_hw[:, 0] // fh)
    vw = -(-valid_hw[:, 1] // fw)
    rows = jnp.arange(x.shape[1])[None, :, None] < vh[:, None, None]
    cols = jnp.arange(x.shape[2])[None, None, :] < vw[:, None, None]
    return jnp.where((rows & cols)[..., None], x, jnp.zeros((), x.dtype))
