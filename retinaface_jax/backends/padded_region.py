"""The valid region of a padded batch and the mask that zeroes everything outside it.

Shared by every path that runs the network on padded bucket batches (``inference.padding`` for
the model itself, ``backends.native.kernel_forward`` for the native kernels), as an explicit
value handed to the code that runs the network.
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
